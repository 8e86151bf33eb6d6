"""A site's state for a grid of paths: one :class:`SiteState` per path it trains.

Each path has its own model, inner optimizer, error-feedback residual and reader (over the
rows routed to it, in its own seeded order), saved under ``state_dir/paths/<path>/`` round
by round, exactly as a dense site's state is. A path a site trains in round 3 and again in
round 7 continues from its own end of round 3. Only the path of the current round is held
in memory: the others are on disk. Rows are routed once per router, with the router the
run spec carries, and the routes kept with the site's state (:mod:`atoll.paths.site_rows`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from atoll.data.reader import TokenDataset
from atoll.federation.protocol import RoundPlan, RunSpec
from atoll.federation.site_state import SiteState
from atoll.paths.assignment import from_spec
from atoll.paths.grid import parse_path
from atoll.paths.site_rows import route_split
from atoll.train.distributed import Parallel


class PathStates:
    """The per-path states of one site (or of one of its processes)."""

    def __init__(self, name: str, data_dir: Path, state_dir: Path, device: torch.device,
                 parallel: Parallel) -> None:
        self.name = name
        self.data_dir = data_dir
        self.state_dir = state_dir
        self.device = device
        self.parallel = parallel
        self._states: dict[str, SiteState] = {}
        self._routes: tuple[str, np.ndarray] | None = None  # (build key, path of each row)

    def for_plan(self, plan: RoundPlan, spec: RunSpec) -> SiteState:
        """The state that trains ``plan``'s path (the only one left in memory)."""
        cfg, router = from_spec(spec.paths)
        path = parse_path(plan.path, cfg)
        if self._routes is None or self._routes[0] != spec.build_key:
            dataset = TokenDataset(self.data_dir, "train", spec.seq_len)
            self._routes = (spec.build_key, route_split(dataset, router, cfg, self.state_dir))
        for other, st in self._states.items():
            if other != plan.path:
                st.unload()
        if plan.path not in self._states:
            st = SiteState(self.name, self.data_dir,
                           self.parallel.state_dir(self.state_dir / "paths" / plan.path),
                           self.device, self.parallel)
            st.rows = np.flatnonzero(self._routes[1] == cfg.paths().index(path))
            self._states[plan.path] = st
        st = self._states[plan.path]
        if not len(st.rows):
            raise ValueError(f"site {self.name}: no row of {self.data_dir} routes to path "
                             f"{plan.path}")
        return st
