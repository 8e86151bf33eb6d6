"""What the Flower engine puts in a message and reads out of a reply.

A plan (or an evaluation or feature request) goes out as its header in a config record plus
the shared weights payload; a reply is parsed as hostile input: its header with the wire
limits, its payload only from the store folder of its site and round, every field checked.
No reply, however made, raises here: it becomes a :class:`SiteFailure` with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from atoll.engines.transport import unpack
from atoll.federation.evaluation import checked_report
from atoll.federation.features import FeatureReport
from atoll.federation.protocol import (
    EvalReport,
    SiteFailure,
    SiteUpdate,
    WireError,
    header,
)
from atoll.federation.wire_checks import checked_update, parse_header


def plan_message(payload: RecordDict, plan: Any, store: str) -> RecordDict:
    """A site's train (evaluate, features) message: the shared weights payload plus this
    site's plan (or request) header."""
    content = RecordDict({"plan": ConfigRecord({"header": json.dumps(header(plan)),
                                                "store": store})})
    for name, rec in payload.array_records.items():
        content[name] = rec
    content["meta"] = payload.config_records["meta"]
    return content


def decode_report(reply: Message, site: str, round_: int, bytes_down: int
                  ) -> EvalReport | SiteFailure:
    """Site ``site``'s evaluation report, each field checked, or why it is refused."""
    try:
        text = str(reply.content.config_records["update"]["header"])
        report = checked_report(parse_header(text), sender=site)
    except WireError as e:
        return SiteFailure(site, round_, f"undecodable report: {e}")
    except Exception as e:  # noqa: BLE001 - no reply may stop the round
        return SiteFailure(site, round_, f"undecodable report ({type(e).__name__}: {e})")
    report.bytes_down, report.bytes_up = bytes_down, len(text)
    return report


def decode_reply(reply: Message, site: str, round_: int, bytes_down: int,
                 folder: str = "", max_bytes: int = 0, node_key: str = "",
                 check: Callable[..., Any] = checked_update
                 ) -> SiteUpdate | FeatureReport | SiteFailure:
    """Site ``site``'s reply as an update (or, with ``check``, a feature report) whose
    header fields all have their types, or the reason it is refused: no reply, however
    made, raises here. Its payload is read only from ``folder`` (the store's folder of
    this site and round), at most ``max_bytes``; ``node_key`` is the key its node
    authenticated with."""
    try:
        text = str(reply.content.config_records["update"]["header"])
        head = parse_header(text)
        blob = unpack(reply.content, folder, max_bytes)
        update = check(head, blob, sender=site)
    except WireError as e:
        return SiteFailure(site, round_, f"undecodable reply: {e}")
    except Exception as e:  # noqa: BLE001 - no reply may stop the round
        return SiteFailure(site, round_, f"undecodable reply ({type(e).__name__}: {e})")
    update.bytes_down = bytes_down
    if isinstance(update, SiteUpdate):
        update.node_key = node_key
    update.bytes_up = len(blob) + len(text)
    return update
