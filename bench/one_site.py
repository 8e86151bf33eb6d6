"""One site driven round by round by a real coordinator, for benchmarks that time
``Site.run`` itself (``overhead.py``, ``hetero.py``).

The plans come from the coordinator of a :class:`~atoll.app.run.Run`, so they are what a
federation sends (weights encoded with the downlink codec, the run spec on first contact),
whatever shape plans take; a benchmark never builds one by hand.
"""

from __future__ import annotations

import time
from pathlib import Path

from atoll.app.run import Run
from atoll.app.run_config import RunConfig
from atoll.federation.protocol import SiteUpdate
from atoll.federation.site import Site


class OneSite:
    """The first site of ``cfg`` and the coordinator of a run of ``cfg`` in ``out``."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        self.run = Run(cfg, out)
        s = cfg.sites[0]
        self.site = Site(s.name, s.data, self.run.out / "sites" / s.name, pace_s=s.pace_s)

    def round(self) -> tuple[SiteUpdate, float]:
        """One round: the coordinator's plan, ``Site.run`` on it (timed, in seconds), the
        update folded in so that the next plan follows on."""
        coordinator = self.run.coordinator
        plan = coordinator.open_round([self.site.name])[self.site.name]
        start = time.perf_counter()
        update = self.site.run(plan)
        seconds = time.perf_counter() - start
        coordinator.accept(update)
        coordinator.close()
        return update, seconds

    def close(self) -> None:
        self.run.close()
