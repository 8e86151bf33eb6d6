"""The coordinator's view of a grid: the router, each site's tokens per path, and which path
a site trains in a round.

The router travels to the sites inside the run spec (:func:`paths_spec`: its settings and
centroids as plain numbers, so the spec stays JSON and its id covers the router). A site's
tokens per path are estimated from its feature sample: the sample routed, each row standing
for ``rows / sampled`` of the site's rows. The path of a site in a round is drawn from those
estimates (:func:`atoll.paths.planning.assign_paths`), seeded by the run's seed, the round and
the site's name, so it is the same whenever it is asked again (a late update, a resume).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from atoll.paths.grid import Path, PathsConfig, path_name
from atoll.paths.planning import assign_paths, cap_sites
from atoll.paths.router import Router
from atoll.paths.router_config import RouterConfig


def paths_spec(cfg: PathsConfig, router: Router) -> dict[str, Any]:
    """What a site must know of the grid: its levels and the fitted router."""
    return {"levels": cfg.levels, "modules_per_level": cfg.modules_per_level,
            "router": {"settings": asdict(router.cfg), "idf": router.idf.tolist(),
                       "centroids": [c.tolist() for c in router.centroids]}}


def from_spec(spec: dict[str, Any]) -> tuple[PathsConfig, Router]:
    """The grid and router a run spec's ``paths`` describes."""
    r = spec["router"]
    cfg = PathsConfig(spec["levels"], spec["modules_per_level"], RouterConfig(**r["settings"]))
    router = Router([torch.tensor(c, dtype=torch.float32) for c in r["centroids"]], cfg.router,
                    cfg.modules_per_level, torch.tensor(r["idf"], dtype=torch.float32))
    return cfg, router


class PathAssignment:
    """Which site trains which path, and under which names its update counts."""

    def __init__(self, cfg: PathsConfig, router: Router, grid_keys: list[str], seed: int
                 ) -> None:
        self.cfg = cfg
        self.router = router
        self.seed = seed
        self.tokens: dict[str, dict[Path, int]] = {}
        self._names = {p: _names_on(p, grid_keys, cfg) for p in cfg.paths()}

    def estimate(self, site: str, features: np.ndarray, rows: int, seq_len: int) -> None:
        """Set ``site``'s tokens per path from its feature sample and its row count."""
        routed = self.router.route(features)
        scale = rows / len(routed)
        self.tokens[site] = {p: round(routed.count(p) * scale) * seq_len
                             for p in self.cfg.paths() if p in routed}

    def path_of(self, site: str, round_: int) -> Path | None:
        """The path ``site`` trains in ``round_`` (None: nothing is known of its data)."""
        if site not in self.tokens:
            return None
        return assign_paths({site: self.tokens[site]}, round_, self.seed).get(site)

    def trainers(self, sites: list[str], round_: int) -> list[str]:
        """Those of ``sites`` that train in ``round_``: every one with a path, at most
        ``sites_per_path`` of them on each path."""
        drawn = {s: p for s in sites if (p := self.path_of(s, round_)) is not None}
        return sorted(cap_sites(drawn, self.cfg.sites_per_path, round_, self.seed))

    def names(self, path: Path) -> dict[str, str]:
        """``path``'s parameters as the base model names them -> their grid keys."""
        return self._names[path]

    def state_dict(self) -> dict[str, Any]:
        """The estimates, for a checkpoint."""
        return {"path_tokens": {s: {path_name(p): n for p, n in t.items()}
                                for s, t in self.tokens.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go back to :meth:`state_dict`'s estimates."""
        by_name = {path_name(p): p for p in self.cfg.paths()}
        self.tokens = {s: {by_name[k]: int(n) for k, n in t.items()}
                       for s, t in state.get("path_tokens", {}).items()}


def _names_on(path: Path, grid_keys: list[str], cfg: PathsConfig) -> dict[str, str]:
    out = {}
    for key in grid_keys:
        module, _, name = key.partition("/")
        if cfg.module_of(name, path) == module:
            out[name] = key
    return out
