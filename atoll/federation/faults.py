"""Site misbehaviour that can be switched on for tests, drills and ``bench/attacks.py``: how
the coordinator copes is part of what atoll promises.

What a hostile or broken site does to its own pseudo-gradient (the site applies it before it
encodes and signs the update, so the coordinator sees a well-formed, signed message, as it
would from a real attacker):

* ``sign_flip``: the update negated and scaled x10 (drags the model backwards);
* ``scale100``: the update scaled x100;
* ``noise``: Gaussian noise with the norm of the honest update;
* ``zero``: all zeros (a free rider that trains nothing);
* ``replay``: the first update it ever sent, sent again (a free rider);
* ``nan``: NaN values;
* ``shape``: one tensor one element short;
* ``update_poison``: finite values of 1e37 (a sum of them overflows float32: NaN weights).

What a broken site or network does to the message (applied after encoding):

* ``stale``: the update claims to belong to the previous round;
* ``garbage``: the payload bytes are random (undecodable).

What a hostile site writes in its reply's header (:func:`mangle_header`):

* ``header_nan``: a NaN training loss (``NaN`` is not JSON);
* ``header_bad_type``: the token count as a string;
* ``header_huge_tokens``: a million times the tokens it read (its weight in the mean);
* ``header_huge_steps``: a thousand times the steps and tokens;
* ``header_wrong_round``: the next round's number;
* ``header_wrong_site``: another site's name (``header_wrong_site=NAME``);
* ``header_deep_json``: a receipt nested 500 lists deep (a parser's recursion);
* ``header_unbound_signer``: the receipt re-signed with a fresh key that the site's node
  key does not vouch for (a key trusted on first use would pass);
* ``header_node_key``: the header names the node key itself (that is the engine's to say).

What a hostile site writes in its evaluation report (its training stays honest):

* ``eval_nan``: a NaN loss;
* ``eval_huge_tokens``: a thousand times the held-out tokens it measured;
* ``eval_wrong_round``: the next round's number.

What a hostile site sends as a grid's routing features: ``features_poison``, every row's
features a thousand long (to drag the router's centroids its way).

A fault spec of several names (``a,b,c``) shows them in turn, one a round
(:func:`~atoll.federation.fault_kinds.parse_faults`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load

from atoll.federation.checks import global_norm
from atoll.federation.fault_kinds import DELTA_FAULTS, EVAL_FAULTS, parse_faults
from atoll.federation.protocol import EvalRequest, RoundPlan, RunSpec, tensor_bytes
from atoll.federation.site import Site
from atoll.ledger.receipts import sign_receipt
from atoll.ledger.signing import Signer


@torch.no_grad()
def corrupt_delta(delta: dict[str, torch.Tensor], fault: str, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """The pseudo-gradient a site with ``fault`` sends instead of ``delta`` (``replay`` is
    handled by :class:`FaultySite`, which remembers what it sent)."""
    if fault == "sign_flip":
        return {k: -10.0 * v for k, v in delta.items()}
    if fault == "scale100":
        return {k: 100.0 * v for k, v in delta.items()}
    if fault == "noise":
        g = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(v.shape, generator=g) for k, v in delta.items()}
        scale = global_norm(delta) / global_norm(noise)
        return {k: v * scale for k, v in noise.items()}
    if fault == "zero":
        return {k: torch.zeros_like(v) for k, v in delta.items()}
    if fault == "nan":
        return {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
    if fault == "shape":
        first = next(iter(delta))
        return {**delta, first: delta[first].reshape(-1)[:-1]}
    if fault == "update_poison":
        return {k: torch.full_like(v, 1e37) for k, v in delta.items()}
    return delta


DEEP_JSON = 500
"""Nesting of ``header_deep_json``'s receipt: deep for a header, shallow enough for the
site's own JSON encoder."""


def mangle_header(head: dict[str, Any], fault: str, arg: str = "") -> dict[str, Any]:
    """The reply header a site with the header fault ``fault`` sends instead of ``head``."""
    head = dict(head)
    if fault == "header_nan":
        head["train_loss"] = float("nan")
    elif fault == "header_bad_type":
        head["tokens"] = str(head["tokens"])
    elif fault == "header_huge_tokens":
        head["tokens"] *= 10**6
    elif fault == "header_huge_steps":
        head["steps"] *= 1000
        head["tokens"] *= 1000
    elif fault == "header_wrong_round":
        head["round"] += 1
    elif fault == "header_wrong_site":
        head["site"] = arg or "someone-else"
    elif fault == "header_deep_json":
        nested: list = []
        for _ in range(DEEP_JSON):
            nested = [nested]
        head["receipt"] = {**head["receipt"], "extra": nested}
    elif fault == "header_unbound_signer":
        stranger = Signer.generate()
        head["signer"] = stranger.public
        head["receipt_signature"] = sign_receipt(head["receipt"], stranger)
    elif fault == "header_node_key":
        head["node_key"] = "-----BEGIN PUBLIC KEY-----\nforged\n-----END PUBLIC KEY-----\n"
    return head


class FaultySite(Site):
    """A site that misbehaves on purpose, in the stage where its misbehaviour belongs: the
    pseudo-gradient (delta faults), the encoded update (``replay``) or the message
    (``stale``, ``garbage``). Everything else is an honest :class:`Site`."""

    def __init__(self, name: str, data_dir: str | Path, state_dir: str | Path, fault: str,
                 pace_s: float = 0.0, device: str = "cpu") -> None:
        self.faults = parse_faults(fault) or [("", "")]
        super().__init__(name, data_dir, state_dir, pace_s, device)
        self.fault = fault
        self._first_sent: dict[str, torch.Tensor] | None = None

    def fault_of(self, round_: int) -> tuple[str, str]:
        """The fault (kind, argument) shown in ``round_``: the spec's faults in turn."""
        return self.faults[(round_ - 1) % len(self.faults)]

    def pseudo_gradient(self, plan: RoundPlan, spec: RunSpec) -> dict[str, torch.Tensor]:
        """The honest pseudo-gradient, corrupted by a delta fault."""
        delta = super().pseudo_gradient(plan, spec)
        fault = self.fault_of(plan.round)[0]
        if fault in DELTA_FAULTS:
            delta = corrupt_delta(delta, fault, seed=plan.round)
        return delta

    def encode(self, plan: RoundPlan, spec: RunSpec, delta: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
        """The encoded update; ``replay`` sends the first one it ever sent, every round."""
        encoded = super().encode(plan, spec, delta)
        if self.fault_of(plan.round)[0] == "replay":
            self._first_sent = self._first_sent or encoded
            return self._first_sent
        return encoded

    def answer(self, head: dict[str, Any], blob: bytes,
               on_step: Callable[[int, float], None] | None = None
               ) -> tuple[dict[str, Any], bytes]:
        """The update's wire form, as a broken site or network mangles it."""
        fault, arg = self.fault_of(int(head["round"]))
        if head.get("type") == EvalRequest.__name__:
            return self._mangled_report(*super().answer(head, blob), fault), b""
        if head.get("type") == "FeatureRequest":
            report, features = super().answer(head, blob)
            if fault == "features_poison":
                x = load(features)["features"]
                features = tensor_bytes({"features": torch.full_like(x, 1000.0)})
            return report, features
        head, blob = super().answer(head, blob, on_step)
        if fault in EVAL_FAULTS:
            pass  # honest training
        elif fault == "stale":
            head = {**head, "round": head["round"] - 1}
        elif fault == "garbage":
            blob = os.urandom(len(blob))
        elif fault.startswith("header_"):
            head = mangle_header(head, fault, arg)
        return head, blob


    @staticmethod
    def _mangled_report(head: dict[str, Any], blob: bytes, fault: str) -> dict[str, Any]:
        """An evaluation report as a lying site writes it."""
        if fault == "eval_nan":
            return {**head, "loss": float("nan")}
        if fault == "eval_huge_tokens":
            return {**head, "tokens": head["tokens"] * 1000}
        if fault == "eval_wrong_round":
            return {**head, "round": head["round"] + 1}
        return head


def make_site(name: str, data_dir: str | Path, state_dir: str | Path, *, pace_s: float = 0.0,
              fault: str = "", device: str = "cpu") -> Site:
    """An honest :class:`Site`, or a :class:`FaultySite` when ``fault`` names one, training
    on ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    if fault:
        return FaultySite(name, data_dir, state_dir, fault, pace_s, device)
    return Site(name, data_dir, state_dir, pace_s, device)
