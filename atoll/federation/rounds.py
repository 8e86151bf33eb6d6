"""Where a round starts: select sites, send plans, take replies, close with the outer step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from atoll.federation.coordinator import Coordinator, RoundOutcome
from atoll.federation.engine import Engine
from atoll.federation.protocol import SiteFailure, SiteUpdate


@dataclass
class RoundResult:
    """A closed round plus every reply it got (accepted or not), for metrics and display."""

    outcome: RoundOutcome
    replies: list[SiteUpdate] = field(default_factory=list)
    failures: list[SiteFailure] = field(default_factory=list)


def run_round(coordinator: Coordinator, engine: Engine,
              on_open: Callable[[int, list[str]], None] | None = None,
              on_reply: Callable[[str, bool, str], None] | None = None) -> RoundResult:
    """One round of DiLoCo: every reply is checked; one bad site never stops the others.

    ``on_open(round, sites)`` and ``on_reply(site, accepted, detail)`` let a caller show
    progress (the run's status board)."""
    sites = coordinator.select(engine.available_sites())
    plans = coordinator.open_round(sites)
    if on_open is not None:
        on_open(coordinator.round + 1, sites)
    replies, failures = [], []
    for reply in engine.exchange(plans, coordinator.cfg.federation.deadline_s):
        if isinstance(reply, SiteFailure):
            coordinator.reject(reply.site, reply.reason)
            failures.append(reply)
            if on_reply is not None:
                on_reply(reply.site, False, reply.reason)
            continue
        reason = coordinator.accept(reply)  # a rejection is recorded in the outcome
        replies.append(reply)
        if on_reply is not None:
            on_reply(reply.site, reason is None,
                     reason or f"loss {reply.train_loss:.4f}, {reply.tokens} tokens")
    planned = set(plans)
    answered = {r.site for r in replies} | {f.site for f in failures}
    for site in sorted(planned - answered):
        coordinator.reject(site, "no reply")
    return RoundResult(coordinator.close(), replies, failures)
