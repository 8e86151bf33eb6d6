"""How well the path router separates the demo's four domains (DiPaCo's coarse routing).

Rows of the demo's four domains, equally many each, are routed by k-means over their
prefix features (:mod:`atoll.paths.router`); the figure is the clusters' purity (the share
of rows whose cluster's majority domain is their own; chance is 1/clusters), for a 2 x 2
grid routed flat (one k-means over its 4 paths) and by product k-means (one per level),
with and without the idf weighting, over a few seeds. The baseline in the same run: rows
assigned to paths at random.

    python bench/routing.py [--rows 400] [--seq-len 128] [--seeds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from smoke import parse

from atoll.data.demo import build_demo_data
from atoll.data.reader import TokenDataset
from atoll.paths.grid import PathsConfig
from atoll.paths.router import Router, RouterConfig, prefix_features

SMOKE = {"rows": 40, "tokens": 40_000, "seq_len": 64, "seeds": 1}
GRIDS = {"4 paths (2 x 2), flat": (PathsConfig([[0, 2], [2, 4]], [2, 2]), "flat"),
         "4 paths (2 x 2), product": (PathsConfig([[0, 2], [2, 4]], [2, 2]), "product")}


def purity(paths: list, labels: list[str]) -> float:
    """The share of rows whose path's majority domain is their own."""
    clusters = {p: Counter(lab for q, lab in zip(paths, labels, strict=True) if q == p)
                for p in set(paths)}
    return sum(c.most_common(1)[0][1] for c in clusters.values()) / len(labels)


def domain_rows(root: Path, rows: int) -> tuple[np.ndarray, list[str]]:
    out, labels = [], []
    for d in sorted(p for p in root.iterdir() if (p / "manifest.json").exists()):
        ds = TokenDataset(d, "train")
        pick = np.sort(np.random.default_rng(0).choice(len(ds), min(rows, len(ds)), replace=False))
        out.append(ds.rows(pick))
        labels += [d.name] * len(pick)
    return np.concatenate(out), labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400, help="rows per domain")
    ap.add_argument("--tokens", type=int, default=400_000, help="tokens per domain prepared")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    args = parse(ap, SMOKE)
    with tempfile.TemporaryDirectory(prefix="atoll-routing-") as tmp:
        build_demo_data(tmp, tokens_per_domain=args.tokens, seq_len=args.seq_len,
                        log=lambda s: None)
        rows, labels = domain_rows(Path(tmp), args.rows)
    cfg = RouterConfig(prefix_tokens=min(64, args.seq_len))
    feats = prefix_features(rows, cfg)
    print(f"{len(rows)} rows of {args.seq_len} tokens from 4 domains; features of the first "
          f"{cfg.prefix_tokens} tokens, {cfg.dim} buckets; purity over seeds 0..{args.seeds - 1}")
    for name, (grid, kind) in GRIDS.items():
        for idf in (True, False):
            got = []
            for seed in range(args.seeds):
                one = RouterConfig(**{**cfg.__dict__, "seed": seed, "idf": idf, "kind": kind})
                got.append(purity(Router.fit(feats, grid, one).route(feats), labels))
            print(f"  {name:<26} {'idf' if idf else 'no idf':<7} purity "
                  f"{min(got):.3f}-{max(got):.3f} (mean {np.mean(got):.3f})")
    rng = np.random.default_rng(0)
    chance = [purity(rng.integers(0, 4, len(rows)).tolist(), labels) for _ in range(args.seeds)]
    print(f"  random paths (baseline)  purity {np.mean(chance):.3f}")


if __name__ == "__main__":
    main()
