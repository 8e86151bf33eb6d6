"""What a site does with its own rows for paths: a feature sample for the router, and the
path of every row once the router is known.

Both apply consent like everything else that reads a site's data: a row whose source the
purpose does not allow is never sampled, and never trained on whatever path it routes to.
Routes are computed once per router and kept in the site's state (``routes-<digest>.npy``),
so a restart routes nothing again and a new router can never be mixed up with an old one.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path as FilePath

import numpy as np
import torch

from atoll.data.reader import TokenDataset, allowed_mask
from atoll.paths.grid import Path, PathsConfig
from atoll.paths.router import Router, RouterConfig, prefix_features
from atoll.util.atomic import write_atomic
from atoll.util.hashing import tensors_digest

ROUTE_BATCH = 4096
"""Rows routed at a time: a large split is never held whole as features."""


def _allowed_rows(dataset: TokenDataset, allow: Callable[[int], bool] | None) -> np.ndarray:
    idx = np.arange(len(dataset))
    return idx if allow is None else idx[allowed_mask(dataset.source_of(idx), allow)]


def sample_features(dataset: TokenDataset, cfg: RouterConfig, seed: int,
                    allow: Callable[[int], bool] | None = None) -> np.ndarray:
    """The features of up to ``cfg.sample_rows`` rows drawn (seeded) from the rows consent
    allows: what the site sends for fitting the router (no text, no token ids)."""
    idx = _allowed_rows(dataset, allow)
    n = min(cfg.sample_rows, len(idx))
    pick = np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
    return prefix_features(dataset.rows(pick), cfg)


def router_digest(router: Router) -> str:
    """A short name for a fitted router (its settings, weights and centroids)."""
    tensors = {"idf": router.idf, **{f"level{i}": c for i, c in enumerate(router.centroids)}}
    text = f"{sorted(router.cfg.__dict__.items())}|{tensors_digest(tensors)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def route_split(dataset: TokenDataset, router: Router, paths: PathsConfig,
                cache: FilePath | None = None) -> np.ndarray:
    """The index (into ``paths.paths()``) of every row's path, int16; read from ``cache``
    (a folder) when this router routed the split before, and kept there otherwise."""
    file = cache / f"routes-{router_digest(router)}.npy" if cache is not None else None
    if file is not None and file.exists():
        routes = np.load(file)
        if len(routes) == len(dataset):
            return routes
    order = {p: i for i, p in enumerate(paths.paths())}
    routes = np.empty(len(dataset), dtype=np.int16)
    for start in range(0, len(dataset), ROUTE_BATCH):
        idx = np.arange(start, min(start + ROUTE_BATCH, len(dataset)))
        routes[idx] = [order[p] for p in router.route_rows(dataset.rows(idx))]
    if file is not None:
        buf = io.BytesIO()
        np.save(buf, routes)
        write_atomic(file, buf.getvalue())
    return routes


def rows_of_path(routes: np.ndarray, path: Path, paths: PathsConfig, dataset: TokenDataset,
                 allow: Callable[[int], bool] | None = None) -> np.ndarray:
    """The rows a site trains ``path`` on: routed there, and allowed by consent."""
    idx = np.flatnonzero(routes == paths.paths().index(path))
    return idx if allow is None else idx[allowed_mask(dataset.source_of(idx), allow)]


def tokens_per_path(routes: np.ndarray, paths: PathsConfig, dataset: TokenDataset,
                    allow: Callable[[int], bool] | None = None) -> dict[Path, int]:
    """How many allowed tokens the site holds on each path (what planning weighs)."""
    idx = _allowed_rows(dataset, allow)
    counts = np.bincount(routes[idx], minlength=len(paths.paths()))
    return {p: int(counts[i]) * dataset.seq_len for i, p in enumerate(paths.paths())}


class RoutedRows:
    """The rows of a split routed to one path, read like the whole split (a
    :class:`~atoll.data.reader.PackedReader` over it walks its own seeded order of them,
    with its own cursor: one resumable reader per path)."""

    def __init__(self, dataset: TokenDataset, rows: np.ndarray) -> None:
        self.dataset = dataset
        self.index = np.asarray(rows, dtype=np.int64)
        self.root, self.manifest = dataset.root, dataset.manifest
        self.seq_len, self.sources = dataset.seq_len, dataset.sources

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` of this path's rows."""
        return self.dataset.rows(self.index[index])

    def source_of(self, index: np.ndarray) -> np.ndarray:
        """The manifest source of each of rows ``index`` of this path's rows."""
        return self.dataset.source_of(self.index[index])


def batches_by_path(batches: list[torch.Tensor], router: Router, paths: PathsConfig
                    ) -> dict[Path, list[torch.Tensor]]:
    """Held-out ``batches`` regrouped by the path each row routes to: batches of the same
    size, rows in their order (one path that takes every row gets the batches back as they
    were)."""
    if not batches:
        return {}
    rows = torch.cat(batches)
    routes = router.route_rows(rows.numpy())
    out = {}
    for path in paths.paths():
        mine = rows[[i for i, p in enumerate(routes) if p == path]]
        if len(mine):
            out[path] = list(torch.split(mine, batches[0].shape[0]))
    return out
