"""Where a round starts: select sites, send plans, take replies, close with the outer step."""

from __future__ import annotations

from dataclasses import dataclass, field

from atoll.federation.coordinator import Coordinator, RoundOutcome
from atoll.federation.protocol import Engine, SiteFailure, SiteUpdate


@dataclass
class RoundReport:
    """A closed round plus every reply it got (accepted or not), for metrics and display."""

    outcome: RoundOutcome
    replies: list[SiteUpdate] = field(default_factory=list)
    failures: list[SiteFailure] = field(default_factory=list)


def run_round(coordinator: Coordinator, engine: Engine) -> RoundReport:
    """One round of DiLoCo: every reply is checked; one bad site never stops the others."""
    sites = coordinator.select(engine.available_sites())
    plans = coordinator.open_round(sites)
    replies, failures = [], []
    for reply in engine.exchange(plans, coordinator.cfg.deadline_s):
        if isinstance(reply, SiteFailure):
            coordinator.reject(reply.site, reply.reason)
            failures.append(reply)
            continue
        coordinator.accept(reply)  # a rejection is recorded in the outcome with its reason
        replies.append(reply)
    planned = set(plans)
    answered = {r.site for r in replies} | {f.site for f in failures}
    for site in sorted(planned - answered):
        coordinator.reject(site, "no reply")
    return RoundReport(coordinator.close(), replies, failures)
