"""What a run of a grid of paths (``model.paths``) adds to a dense one.

Before the first round the coordinator asks every site for features of a sample of its rows
(:mod:`atoll.federation.features`), fits the router on them and saves it in ``router/`` of
the run folder (a resumed run reads it back: routing never changes within a run); a site
that joins later is asked for its features when it is first seen, which only estimates its
tokens per path. Then the rounds run as in a dense run, each site on its path.

Validation routes every held-out row to its path and measures it there, per domain; the
credit probe is the gradient of that routed loss with respect to every module; the model
exported is every path as a Hugging Face model plus the router (:mod:`atoll.app.paths_export`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path as FilePath
from typing import TYPE_CHECKING

import numpy as np
import torch

from atoll.app.paths_export import export_paths
from atoll.federation.coordinator import Coordinator
from atoll.federation.engine import Engine
from atoll.federation.evaluation import EvalOutcome, ask_sites, eval_requests
from atoll.federation.features import collect_features, feature_requests
from atoll.federation.settings import CoordinatorConfig
from atoll.ledger.credit import ValidationGradient
from atoll.paths.assignment import PathAssignment
from atoll.paths.grid import Path, PathsConfig, grid_from_dense, path_name, path_weights
from atoll.paths.router import Router
from atoll.paths.site_rows import batches_by_path
from atoll.train.evaluate import loss_and_tokens
from atoll.util.weights import load_weights

if TYPE_CHECKING:
    from atoll.app.run_config import RunConfig

ROUTER_DIR = "router"


class GridRun:
    """The router, the routed evaluation and the export of one run's grid."""

    def __init__(self, cfg: PathsConfig, out: FilePath, coordinator: Coordinator,
                 model: torch.nn.Module, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.folder = out / ROUTER_DIR
        self.coordinator = coordinator
        self.model = model  # one path's shape: what routed evaluation loads each path into
        self.log = log
        self.router: Router | None = None
        if (self.folder / "router.json").exists():  # a resumed run: the router it fitted
            self._use(Router.load(self.folder))

    def _use(self, router: Router) -> None:
        self.router = router
        c = self.coordinator
        c.use_paths(PathAssignment(self.cfg, router, list(c.weights), c.cfg.seed))

    def know_sites(self, engine: Engine, sites: list[str], deadline_s: float) -> None:
        """Ask ``sites`` that have not sent features yet for them; fit the router on the
        first answers, and estimate each answering site's tokens per path."""
        assignment = self.coordinator.paths
        unknown = [s for s in sites if assignment is None or s not in assignment.tokens]
        if not unknown:
            return
        c = self.coordinator.cfg
        got = collect_features(engine, feature_requests(
            c.run_id, unknown, self.cfg.router, c.seq_len, c.purpose, c.seed), deadline_s)
        for site, reason in got.refused.items():
            self.log(f"  features of {site} not used: {reason}")
        if not got.features and self.router is None:
            raise RuntimeError("no site sent usable features to fit the router on: "
                               + "; ".join(f"{s}: {r}" for s, r in got.refused.items()))
        if self.router is None:
            sample = np.concatenate([got.features[s] for s in sorted(got.features)])
            router = Router.fit(sample, self.cfg, self.cfg.router)
            router.save(self.folder)
            self._use(router)
            self.log(f"router fitted on {len(sample)} rows of {len(got.features)} sites: "
                     f"{len(self.cfg.paths())} paths")
        for site in sorted(got.features):
            self.coordinator.paths.estimate(site, got.features[site], got.rows[site],
                                            c.seq_len)

    def path_weights(self, grid: dict[str, torch.Tensor], path: Path
                     ) -> dict[str, torch.Tensor]:
        """``path`` of ``grid`` as one model's weights."""
        return path_weights(grid, path, self.cfg)

    def routed_batches(self, batches: list[torch.Tensor]) -> dict[Path, list[torch.Tensor]]:
        """``batches`` regrouped by the path each row routes to."""
        return batches_by_path(batches, self.router, self.cfg)

    def evaluate(self, grid: dict[str, torch.Tensor], sets: dict[str, list[torch.Tensor]]
                 ) -> dict[str, float]:
        """Each domain's loss with every row measured on its own path."""
        out = {}
        for domain, batches in sets.items():
            measured = []
            for path, mine in self.routed_batches(batches).items():
                load_weights(self.model, self.path_weights(grid, path))
                measured.append(loss_and_tokens(self.model, mine))
            count = sum(n for _, n in measured)
            out[domain] = measured[0][0] if len(measured) == 1 else \
                sum(loss * n for loss, n in measured) / count
        return out

    def ask_sites(self, engine: Engine, round_: int, sites: list[str], cfg: RunConfig
                  ) -> EvalOutcome:
        """Validation by the sites: each is sent every path its data routes to (by its
        routed sample) and measures it on its held-out rows routed there; each domain's
        loss is the token-weighted mean over its paths."""
        c, e = self.coordinator, cfg.eval
        asked = []
        for path in self.cfg.paths():
            mine = [s for s in sites if c.paths.tokens.get(s, {}).get(path)]
            if mine:
                asked.append((path_name(path), ask_sites(engine, eval_requests(
                    c.run_id, round_, mine, self.path_weights(c.weights, path),
                    self.model.config.to_dict(), cfg.data.seq_len, cfg.purpose, e.batch_size,
                    e.max_batches, path_name(path), c.spec.paths), cfg.federation.deadline_s)))
        if len(asked) == 1:
            return asked[0][1]
        out = EvalOutcome()
        total: dict[str, float] = {}
        for name, got in asked:
            out.refused |= {f"{s} (path {name})": why for s, why in got.refused.items()}
            out.bytes_up, out.bytes_down = out.bytes_up + got.bytes_up, \
                out.bytes_down + got.bytes_down
            for d, loss in got.losses.items():
                total[d] = total.get(d, 0.0) + loss * got.tokens[d]
                out.tokens[d] = out.tokens.get(d, 0) + got.tokens[d]
        out.losses = {d: total[d] / out.tokens[d] for d in sorted(total)}
        out.tokens = {d: out.tokens[d] for d in sorted(total)}
        return out

    def gradient(self, grid: dict[str, torch.Tensor], batches: list[torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        """The gradient, with respect to every module, of the routed validation loss over
        ``batches`` (each path's part weighted by its tokens): the credit probe's."""
        if not batches:
            return {}
        parts = [(path, mine, sum(b.shape[0] * (b.shape[1] - 1) for b in mine))
                 for path, mine in self.routed_batches(batches).items()]
        total = sum(n for _, _, n in parts)
        out: dict[str, torch.Tensor] = {}
        for path, mine, n in parts:
            grads = ValidationGradient(self.model, lambda mine=mine: mine)(
                self.path_weights(grid, path))
            for name, key in self.coordinator.paths.names(path).items():
                if name in grads:
                    g = grads[name] * (n / total)
                    out[key] = out[key] + g if key in out else g
        return out

    def export(self, grid: dict[str, torch.Tensor], tokenizer: object, out: FilePath
               ) -> FilePath:
        """Every path as a Hugging Face model directory under ``out``, and the router."""
        return export_paths(grid, self.cfg, self.model.config, tokenizer, self.router, out)


def build_coordinator(init: dict[str, torch.Tensor], ccfg: CoordinatorConfig,
                      paths: PathsConfig, out: FilePath, model: torch.nn.Module,
                      log: Callable[[str], None]) -> tuple[Coordinator, GridRun | None]:
    """The run's coordinator, from the dense model's initial weights ``init``; with a grid
    of ``paths``, every module starts as a copy of its level's blocks, and the grid's run."""
    if not paths.enabled:
        return Coordinator(init, ccfg), None
    paths.check(model.config.num_hidden_layers,
                tied=bool(getattr(model.config, "tie_word_embeddings", False)))
    coordinator = Coordinator(grid_from_dense(init, paths), ccfg)
    return coordinator, GridRun(paths, out, coordinator, model, log)


def check_paths_combine(cfg: RunConfig) -> None:
    """Refuse what a grid of paths (``model.paths``) does not run with yet, saying why."""
    f = cfg.federation
    refused = {
        "federation.fragments / overlap_steps (streaming sync)": f.fragments > 1 or
        f.overlap_steps > 0,
        "comm.down.delta (a site may train another path next round: paths go whole)":
            cfg.comm.down.delta,
        "privacy (the accountant counts one mean per round, a grid takes one per module)":
            cfg.privacy.enabled}
    for what, bad in refused.items():
        if bad:
            raise ValueError(f"model.paths does not combine with {what}")
