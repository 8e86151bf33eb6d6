"""Coarse routing (DiPaCo): each row of tokens goes to one path, by the features of its
first tokens, with k-means.

Features are computed at the site and are all the coordinator ever sees of the data: a
hashed histogram of the token bigrams of a row's first ``prefix_tokens`` tokens (``dim``
buckets, unit length). No text, no token ids, no model is needed to make them; they do say
something about the text's statistics, which is why the threat model names them.

Two ways to cluster (``kind``). ``flat``, the default: one k-means with a centroid per path
over the whole feature vector. ``product``, as in the paper: the vector is cut into one
slice per level, each level has its own k-means with as many centroids as it has modules,
and a row's path is the nearest centroid of each level; it fits ``K x L`` centroids for
``K^L`` paths, which is what makes a 16 x 16 grid's 256 paths tractable. On the demo's four
domains (``bench/routing.py``) flat routing separates them better at 4 paths (purity 0.91
against 0.73 for 2 x 2 product: each level sees only half the features and splits them
independently of the other), so flat is the default and product is for large grids.
Fitting is deterministic for a seed (k-means++ then Lloyd's iterations, restarted
``restarts`` times, the fit of least inertia kept), and the fitted router is saved with
the run.
"""

from __future__ import annotations

import json
from pathlib import Path as FilePath

import numpy as np
import torch
from safetensors.torch import load_file, save

from atoll.paths.grid import Path, PathsConfig
from atoll.paths.router_config import RouterConfig
from atoll.util.atomic import write_atomic


def prefix_features(rows: np.ndarray, cfg: RouterConfig) -> np.ndarray:
    """Each row's features (float32, ``len(rows) x dim``): its prefix's bigram histogram,
    hashed into ``dim`` buckets and scaled to unit length."""
    prefix = np.asarray(rows)[:, : cfg.prefix_tokens].astype(np.uint64)
    pairs = prefix[:, :-1] * np.uint64(1_000_003) + prefix[:, 1:]
    buckets = ((pairs * np.uint64(2_654_435_761)) >> np.uint64(16)) % np.uint64(cfg.dim)
    out = np.zeros((len(prefix), cfg.dim), dtype=np.float32)
    np.add.at(out, (np.repeat(np.arange(len(prefix)), buckets.shape[1]),
                    buckets.ravel().astype(np.int64)), 1.0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def kmeans(x: torch.Tensor, k: int, iterations: int, seed: int, restarts: int = 1
           ) -> torch.Tensor:
    """``k`` centroids of the rows of ``x``: of ``restarts`` runs (seeds ``seed``,
    ``seed + 1``, ...), the one whose rows lie closest to their centroids (least inertia).
    The same for the same inputs and seed.

    One run from one seed often stops in a poor local optimum: on the demo's four domains,
    the purity of single runs spans 0.58-0.73, and the runs of least inertia are the purest
    (``bench/routing.py``), so a few restarts are worth their cost (a fit sees a few
    thousand rows, once a run)."""
    fits = [_lloyd(x, k, iterations, seed + i) for i in range(restarts)]
    return min(fits, key=lambda c: inertia(x, c))  # the first of equals: deterministic


def inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    """The sum of squared distances from each row of ``x`` to its nearest centroid."""
    return float((torch.cdist(x, centroids).min(dim=1).values ** 2).sum())


def _lloyd(x: torch.Tensor, k: int, iterations: int, seed: int) -> torch.Tensor:
    """One k-means run: k-means++ seeding from ``seed``, then Lloyd's iterations."""
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=gen)]
    while len(centroids) < k:  # k-means++: far points are likelier to seed a centroid
        d = torch.cdist(x, centroids).min(dim=1).values ** 2
        pick = torch.multinomial(d + 1e-12, 1, generator=gen) if d.sum() > 0 else \
            torch.randint(len(x), (1,), generator=gen)
        centroids = torch.cat([centroids, x[pick]])
    for _ in range(iterations):
        nearest = torch.cdist(x, centroids).argmin(dim=1)
        moved = centroids.clone()
        for j in range(k):
            members = x[nearest == j]
            if len(members):
                moved[j] = members.mean(dim=0)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids


class Router:
    """k-means over row features: one set of centroids over the paths (flat) or one per
    level (product).

    Features are weighted by inverse document frequency over the fitting sample before
    clustering (a bigram that every row has says nothing about where a row belongs), then
    each slice clustered is scaled to unit length."""

    def __init__(self, centroids: list[torch.Tensor], cfg: RouterConfig,
                 modules_per_level: list[int], idf: torch.Tensor | None = None) -> None:
        self.centroids = centroids
        self.cfg = cfg
        self.modules_per_level = list(modules_per_level)
        self.idf = idf if idf is not None else torch.ones(cfg.dim)
        self._paths = PathsConfig([[i, i + 1] for i in range(len(modules_per_level))],
                                  self.modules_per_level).paths()

    @classmethod
    def fit(cls, features: np.ndarray, paths: PathsConfig, cfg: RouterConfig) -> Router:
        """Fit on the features the sites sent (rows of :func:`prefix_features`)."""
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))
        cfg.check()
        if cfg.kind == "product" and cfg.dim % len(paths.levels):
            raise ValueError(f"model.paths.router.dim = {cfg.dim} does not split evenly into "
                             f"{len(paths.levels)} levels")
        if len(x) < max(paths.modules_per_level):
            raise ValueError(f"{len(x)} feature rows cannot fit "
                             f"{max(paths.modules_per_level)} centroids")
        seen = (x > 0).sum(dim=0).float()
        idf = torch.log((1 + len(x)) / (1 + seen)) + 1  # smoothed, as in scikit-learn
        router = cls([], cfg, paths.modules_per_level, idf if cfg.idf else None)
        if cfg.kind == "flat":
            whole, = router._slices(x, 1)
            router.centroids = [kmeans(whole, len(router._paths), cfg.iterations, cfg.seed,
                                       cfg.restarts)]
        else:
            slices = router._slices(x, len(paths.levels))
            router.centroids = [kmeans(s, k, cfg.iterations, cfg.seed + lv * cfg.restarts,
                                       cfg.restarts)
                                for lv, (s, k) in enumerate(zip(slices, paths.modules_per_level,
                                                                strict=True))]
        return router

    def _slices(self, x: torch.Tensor, levels: int) -> tuple[torch.Tensor, ...]:
        """``x`` weighted by idf, cut into one unit-length slice per level."""
        parts = torch.chunk(x * self.idf, levels, dim=1)
        return tuple(p / p.norm(dim=1, keepdim=True).clamp_min(1e-12) for p in parts)

    def route(self, features: np.ndarray) -> list[Path]:
        """The path of each row of ``features``."""
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))
        slices = self._slices(x, len(self.centroids))
        nearest = [torch.cdist(s, c).argmin(dim=1).tolist()
                   for s, c in zip(slices, self.centroids, strict=True)]
        if self.cfg.kind == "flat":
            return [self._paths[i] for i in nearest[0]]
        return [tuple(p) for p in zip(*nearest, strict=True)]

    def route_rows(self, rows: np.ndarray) -> list[Path]:
        """The path of each row of tokens."""
        return self.route(prefix_features(rows, self.cfg))

    def save(self, folder: FilePath) -> None:
        """``router.safetensors`` (the centroids) and ``router.json`` (the settings)."""
        folder.mkdir(parents=True, exist_ok=True)
        blob = save({"idf": self.idf.contiguous(),
                     **{f"level{i}": c.contiguous() for i, c in enumerate(self.centroids)}})
        write_atomic(folder / "router.safetensors", blob)
        meta = {"settings": self.cfg.__dict__, "modules_per_level": self.modules_per_level}
        write_atomic(folder / "router.json", json.dumps(meta, indent=1).encode())

    @classmethod
    def load(cls, folder: FilePath) -> Router:
        """The router :meth:`save` wrote."""
        meta = json.loads((folder / "router.json").read_text())
        tensors = load_file(folder / "router.safetensors")
        levels = len(tensors) - 1
        return cls([tensors[f"level{i}"] for i in range(levels)],
                   RouterConfig(**meta["settings"]), meta["modules_per_level"], tensors["idf"])
