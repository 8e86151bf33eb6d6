"""The local engine: every site in this process, one after another, deterministic for a seed.

Messages still go through their wire form (:func:`~atoll.federation.protocol.to_bytes`), so
the byte counts are the real serialized sizes and the local engine exercises the same
encoding as a real federation. A site that raises is reported as a failure; the others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from atoll.federation.protocol import (
    RoundPlan,
    SiteFailure,
    SiteUpdate,
    WireError,
    from_bytes,
    to_bytes,
)
from atoll.federation.site import Site

StepCallback = Callable[[str, int, int, float], None]  # site, round, step, loss


class LocalEngine:
    """Runs :class:`Site` objects in-process."""

    def __init__(self, sites: list[Site], on_step: StepCallback | None = None) -> None:
        self.sites = {s.name: s for s in sites}
        self.on_step = on_step

    def available_sites(self) -> list[str]:
        return list(self.sites)

    def exchange(self, plans: dict[str, RoundPlan], deadline_s: float = 0.0
                 ) -> Iterator[SiteUpdate | SiteFailure]:
        for name, plan in plans.items():
            down = to_bytes(plan)
            try:
                site_plan = from_bytes(down, RoundPlan)
                callback = None
                if self.on_step is not None:
                    def callback(step: int, loss: float, _n: str = name, _r: int = plan.round
                                 ) -> None:
                        self.on_step(_n, _r, step, loss)
                update = self.sites[name].run(site_plan, on_step=callback)
                up = to_bytes(update)
            except Exception as e:  # noqa: BLE001 - one misbehaving site never stops the others
                yield SiteFailure(site=name, round=plan.round, reason=f"{type(e).__name__}: {e}")
                continue
            try:
                reply = from_bytes(up, SiteUpdate)
            except WireError as e:
                yield SiteFailure(site=name, round=plan.round, reason=str(e))
                continue
            reply.bytes_down, reply.bytes_up = len(down), len(up)
            yield reply
