"""Coarse routing (DiPaCo): each row of tokens goes to one path, by the features of its
first tokens, with product k-means.

Features are computed at the site and are all the coordinator ever sees of the data: a
hashed histogram of the token bigrams of a row's first ``prefix_tokens`` tokens (``dim``
buckets, unit length). No text, no token ids, no model is needed to make them; they do say
something about the text's statistics, which is why the threat model names them.

Product k-means, as in the paper: the feature vector is cut into one slice per level, and
each level has its own k-means with as many centroids as the level has modules; a row's path
is the nearest centroid of each level. It fits ``K x L`` centroids for ``K^L`` paths (a flat
k-means over 256 paths would need 256 centroids and a sample to match), and with one level it
is plain k-means. Fitting is deterministic for a seed (k-means++ then Lloyd's iterations),
and the fitted router is saved with the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path as FilePath

import numpy as np
import torch
from safetensors.torch import load_file, save

from atoll.paths.grid import Path, PathsConfig
from atoll.util.atomic import write_atomic


@dataclass
class RouterConfig:
    """How rows are described and clustered (``[paths.router]``)."""

    prefix_tokens: int = 64
    """Tokens of a row's beginning that its features describe."""
    dim: int = 256
    """Hashed bigram buckets (split evenly between the levels)."""
    sample_rows: int = 256
    """Rows whose features each site sends for fitting."""
    iterations: int = 50
    seed: int = 0

    def check(self, levels: int) -> None:
        """Refuse a feature size that cannot be split between ``levels`` levels."""
        if self.prefix_tokens < 2 or self.sample_rows < 1 or self.iterations < 1:
            raise ValueError("paths.router: prefix_tokens >= 2, sample_rows and iterations "
                             ">= 1")
        if self.dim < levels or self.dim % levels:
            raise ValueError(f"paths.router.dim = {self.dim} must split evenly into "
                             f"{levels} levels")


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


def kmeans(x: torch.Tensor, k: int, iterations: int, seed: int) -> torch.Tensor:
    """``k`` centroids of the rows of ``x`` (k-means++ seeding, then Lloyd's iterations);
    the same for the same inputs and seed."""
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
    """Product k-means over row features: one set of centroids per level."""

    def __init__(self, centroids: list[torch.Tensor], cfg: RouterConfig) -> None:
        self.centroids = centroids
        self.cfg = cfg

    @classmethod
    def fit(cls, features: np.ndarray, paths: PathsConfig, cfg: RouterConfig) -> Router:
        """Fit on the features the sites sent (rows of :func:`prefix_features`)."""
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))
        if len(x) < max(paths.modules_per_level):
            raise ValueError(f"{len(x)} feature rows cannot fit "
                             f"{max(paths.modules_per_level)} centroids")
        slices = torch.chunk(x, len(paths.levels), dim=1)
        return cls([kmeans(s, k, cfg.iterations, cfg.seed + lv) for lv, (s, k)
                    in enumerate(zip(slices, paths.modules_per_level, strict=True))], cfg)

    def route(self, features: np.ndarray) -> list[Path]:
        """The path of each row of ``features``."""
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))
        slices = torch.chunk(x, len(self.centroids), dim=1)
        levels = [torch.cdist(s, c).argmin(dim=1).tolist()
                  for s, c in zip(slices, self.centroids, strict=True)]
        return [tuple(p) for p in zip(*levels, strict=True)]

    def route_rows(self, rows: np.ndarray) -> list[Path]:
        """The path of each row of tokens."""
        return self.route(prefix_features(rows, self.cfg))

    def save(self, folder: FilePath) -> None:
        """``router.safetensors`` (the centroids) and ``router.json`` (the settings)."""
        folder.mkdir(parents=True, exist_ok=True)
        blob = save({f"level{i}": c.contiguous() for i, c in enumerate(self.centroids)})
        write_atomic(folder / "router.safetensors", blob)
        write_atomic(folder / "router.json", json.dumps(self.cfg.__dict__, indent=1).encode())

    @classmethod
    def load(cls, folder: FilePath) -> Router:
        """The router :meth:`save` wrote."""
        cfg = RouterConfig(**json.loads((folder / "router.json").read_text()))
        tensors = load_file(folder / "router.safetensors")
        return cls([tensors[f"level{i}"] for i in range(len(tensors))], cfg)
