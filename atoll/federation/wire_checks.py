"""Every field of a site's reply header, checked for type and range before anything uses it.

A reply header is JSON written by a machine the coordinator does not control. It is parsed
with a size and nesting-depth limit (a deeply nested document would exhaust the parser's
recursion) and with ``NaN`` / ``Infinity`` refused (they are not JSON, and a NaN loss or
token count would poison the metrics and the mean). Each field of a
:class:`~atoll.federation.protocol.SiteUpdate` must then have its type, and the numbers
must lie within what the site's plan allowed: no more steps than it was told to take, no
more tokens than those steps can read (``steps x grad_accum x batch_size x seq_len``; a
site's token count is its weight in the mean). Anything else raises :class:`WireError`
naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from atoll.federation.protocol import WIRE_VERSION, RunSpec, SiteUpdate, from_parts
from atoll.util.errors import WireError

MAX_HEADER_BYTES = 8 << 20
"""A reply header is a few kilobytes (a receipt names the sources read); 8 MiB is ample."""
MAX_DEPTH = 32
"""Nesting depth of a reply header (it is 4 deep); deeper documents are refused unparsed."""
MAX_TEXT = 4096
"""Longest string field outside the receipt (names, codecs, keys, signatures)."""

_INTS = ("round", "tokens", "steps", "bytes_up", "bytes_down")
_FLOATS = ("train_loss", "seconds", "compute_seconds")
_STRINGS = ("run_id", "site", "codec", "receipt_signature", "signer", "signer_binding")
_FILLED_IN = {"bytes_up", "bytes_down", "node_key"}
"""Fields the engine fills in; a site may leave them out."""
_FIELDS = {f.name for f in dataclasses.fields(SiteUpdate)} - {"delta"}


def _refuse_constant(name: str) -> None:
    raise WireError(f"header holds {name}, which is not JSON (a NaN or infinite number)")


def nesting_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON ``text`` (brackets inside strings do not
    count): measured without recursion, so any input is safe."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_header(text: str | bytes) -> dict[str, Any]:
    """A reply header's JSON object; :class:`WireError` for anything too large, too deep,
    holding NaN or Infinity, not JSON, or not an object."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if len(text) > MAX_HEADER_BYTES:
        raise WireError(f"header is {len(text)} bytes, the limit is {MAX_HEADER_BYTES}")
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise WireError(f"header is nested {depth} deep, the limit is {MAX_DEPTH}")
    try:
        head = json.loads(text, parse_constant=_refuse_constant)
    except WireError:
        raise
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise WireError(f"header is not JSON ({e})") from None
    if not isinstance(head, dict):
        raise WireError(f"header is a JSON {type(head).__name__}, not an object")
    return head


def check_fields(head: dict[str, Any]) -> None:
    """Refuse (:class:`WireError`) a reply header whose fields are not exactly a
    :class:`SiteUpdate`'s, each of its type: integers (not booleans) >= 0, finite numbers
    >= 0 (the loss may be any finite number), bounded strings, a receipt object."""
    if head.get("v") != WIRE_VERSION or head.get("type") != SiteUpdate.__name__:
        raise WireError(f"expected a SiteUpdate (wire v{WIRE_VERSION})")
    keys = set(head) - {"v", "type"}
    if keys - _FIELDS:
        raise WireError(f"unexpected header field {sorted(keys - _FIELDS)[0]!r}")
    if _FIELDS - keys - _FILLED_IN:
        raise WireError(f"header field {sorted(_FIELDS - keys - _FILLED_IN)[0]!r} is missing")
    if head.get("node_key", "") != "":  # who sent a reply is the engine's to say, never the reply's
        raise WireError("header field 'node_key' is the coordinator's to fill in, not the "
                        "site's")
    for name in _INTS:
        v = head.get(name, 0)
        if type(v) is not int or v < 0:
            raise WireError(f"header field {name!r} must be an integer >= 0, got {v!r:.80}")
    for name in _FLOATS:
        v = head[name]
        if type(v) not in (int, float) or not math.isfinite(v) or (
                name != "train_loss" and v < 0):
            raise WireError(f"header field {name!r} must be a finite number"
                            f"{'' if name == 'train_loss' else ' >= 0'}, got {v!r:.80}")
    for name in _STRINGS:
        v = head[name]
        if type(v) is not str or len(v) > MAX_TEXT:
            raise WireError(f"header field {name!r} must be a string of at most {MAX_TEXT} "
                            f"characters, got {type(v).__name__}")
    if type(head["receipt"]) is not dict:
        raise WireError(f"header field 'receipt' must be an object, got "
                        f"{type(head['receipt']).__name__}")


@dataclass(frozen=True)
class ReplyBounds:
    """What the plan a site was sent allows its reply to say."""

    run_id: str
    round: int
    site: str
    codec: str
    max_steps: int
    """Inner steps the plan asked for (0: a time budget, no bound on the count)."""
    tokens_per_step: int
    """Tokens one inner step reads: ``grad_accum x batch_size x seq_len``."""

    @staticmethod
    def of(spec: RunSpec, round_: int, site: str, steps: int) -> ReplyBounds:
        """The bounds of a reply to a plan for ``site`` in ``round_`` that asked for
        ``steps`` inner steps, under ``spec``."""
        inner = spec.inner
        per_step = int(inner.get("grad_accum", 1)) * int(inner["batch_size"]) * spec.seq_len
        return ReplyBounds(spec.run_id, round_, site, spec.codec_up, steps, per_step)


def check_against_plan(update: SiteUpdate, bounds: ReplyBounds) -> str | None:
    """The reason ``update`` (its fields already of their types) claims more than its plan
    allowed, or None: its run, round, site, codec, step count and token count."""
    if update.run_id != bounds.run_id:
        return f"belongs to run {update.run_id!r:.80}, not {bounds.run_id!r}"
    if update.round != bounds.round:
        return f"for round {update.round}, its plan was for round {bounds.round}"
    if update.site != bounds.site:
        return f"claims to be site {update.site!r:.80}, its plan was for {bounds.site!r}"
    if update.codec != bounds.codec:
        return f"encoded with {update.codec!r:.80}, the federation uses {bounds.codec!r}"
    if update.steps <= 0 or (bounds.max_steps and update.steps > bounds.max_steps):
        limit = f"1..{bounds.max_steps}" if bounds.max_steps else ">= 1"
        return f"reports {update.steps} steps, its plan allowed {limit}"
    most = update.steps * bounds.tokens_per_step
    if not 0 < update.tokens <= most:
        return (f"reports {update.tokens} tokens in {update.steps} steps; at most {most} "
                f"({bounds.tokens_per_step} a step) can be read")
    return None


def checked_update(head: dict[str, Any], blob: bytes, sender: str) -> SiteUpdate:
    """A reply from the node of site ``sender``: header checked field by field, then
    decoded; a header naming another site than its sender is refused."""
    check_fields(head)
    if head["site"] != sender:
        raise WireError(f"claims to be site {head['site']!r:.80}, but was sent by the node "
                        f"of site {sender!r}")
    return from_parts(head, blob, SiteUpdate)
