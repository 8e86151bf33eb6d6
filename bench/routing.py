"""How well the path router separates the demo's four domains (DiPaCo's coarse routing).

Rows of the demo's four domains, equally many each, are routed by k-means over their
prefix features (:mod:`atoll.paths.router`); the figure is the clusters' purity (the share
of rows whose cluster's majority domain is their own; chance is 1/clusters), for a 2 x 2
grid routed flat (one k-means over its 4 paths): from the first 64 tokens and from the
router's default prefix, each with one k-means run and with the router's restarts; then
flat and product k-means (one per level) with and without the idf weighting, over a few
seeds. The baseline in the same run: rows assigned to paths at random.

Then the features the paper routes by: a base model's. A dense ``tiny`` model is trained
``--model-steps`` AdamW steps on a second sample of the same four domains, drawn with
another seed (it may share rows with the routed ones; the domains' labels are never used),
and each row's feature is the mean of its last hidden state over the prefix, each
dimension standardised over the rows; flat k-means on those, with the untrained model as
its control.
This measures what such routing would buy before the federation grows a phase that trains
the base model; atoll's router does not route this way today.

    python bench/routing.py [--rows 400] [--seq-len 128] [--seeds 5] [--model-steps 1000]
                            [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from smoke import parse
from transformers import AutoModelForCausalLM

from atoll.data.demo import build_demo_data
from atoll.data.reader import TokenDataset
from atoll.model import PRESETS
from atoll.paths.grid import PathsConfig
from atoll.paths.router import Router, RouterConfig, prefix_features
from atoll.tokenizer import byte_tokenizer

SMOKE = {"rows": 40, "tokens": 40_000, "seq_len": 64, "seeds": 1, "model_steps": 2}
GRIDS = {"4 paths (2 x 2), flat": (PathsConfig([[0, 2], [2, 4]], [2, 2]), "flat"),
         "4 paths (2 x 2), product": (PathsConfig([[0, 2], [2, 4]], [2, 2]), "product")}


def purity(paths: list, labels: list[str]) -> float:
    """The share of rows whose path's majority domain is their own."""
    clusters = {p: Counter(lab for q, lab in zip(paths, labels, strict=True) if q == p)
                for p in set(paths)}
    return sum(c.most_common(1)[0][1] for c in clusters.values()) / len(labels)


def domain_rows(root: Path, rows: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``rows`` training rows of each domain, drawn with ``seed``, and each row's domain."""
    out, labels = [], []
    for d in sorted(p for p in root.iterdir() if (p / "manifest.json").exists()):
        ds = TokenDataset(d, "train")
        pick = np.sort(np.random.default_rng(seed).choice(len(ds), min(rows, len(ds)),
                                                          replace=False))
        out.append(ds.rows(pick))
        labels += [d.name] * len(pick)
    return np.concatenate(out), labels


def model_features(rows: np.ndarray, train: np.ndarray, steps: int, prefix: int
                   ) -> np.ndarray:
    """Each row's mean last hidden state over its first ``prefix`` tokens, from a dense
    ``tiny`` model trained ``steps`` AdamW steps (16 rows a step) on ``train``."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(PRESETS["tiny"](len(byte_tokenizer())))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    order = np.random.default_rng(0)
    for _ in range(steps):
        batch = torch.from_numpy(train[order.choice(len(train), 16)].astype(np.int64))
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        ids = torch.from_numpy(rows[:, :prefix].astype(np.int64))
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    h = hidden.mean(dim=1)
    return ((h - h.mean(dim=0)) / (h.std(dim=0) + 1e-6)).numpy()  # no dimension dominates


def print_purity(name: str, feats: np.ndarray, labels: list[str], grid: PathsConfig,
                 cfg: RouterConfig, seeds: int) -> None:
    """One line: the purity of ``cfg``'s routing of ``feats`` over ``seeds`` seeds."""
    got = []
    for seed in range(0, 10 * seeds, 10):  # apart, so that no two fits share a restart
        one = RouterConfig(**{**cfg.__dict__, "seed": seed})
        got.append(purity(Router.fit(feats, grid, one).route(feats), labels))
    print(f"  {name:<34} purity {min(got):.3f}-{max(got):.3f} (mean {np.mean(got):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400, help="rows per domain")
    ap.add_argument("--tokens", type=int, default=400_000, help="tokens per domain prepared")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--model-steps", type=int, default=1000,
                    help="training steps of the base model whose features are tried")
    args = parse(ap, SMOKE)
    with tempfile.TemporaryDirectory(prefix="atoll-routing-") as tmp:
        build_demo_data(tmp, tokens_per_domain=args.tokens, seq_len=args.seq_len,
                        log=lambda s: None)
        rows, labels = domain_rows(Path(tmp), args.rows)
        train, _ = domain_rows(Path(tmp), args.rows, seed=1)
    base = RouterConfig()
    print(f"{len(rows)} rows of {args.seq_len} tokens from 4 domains; {base.dim} buckets; "
          f"purity over {args.seeds} seeds (0, 10, 20, ...)")
    flat, _ = GRIDS["4 paths (2 x 2), flat"]
    for prefix in sorted({min(64, args.seq_len), min(base.prefix_tokens, args.seq_len)}):
        for restarts in (1, base.restarts):
            cfg = RouterConfig(prefix_tokens=prefix, restarts=restarts)
            print_purity(f"flat, first {prefix}, {restarts} restart(s)",
                         prefix_features(rows, cfg), labels, flat, cfg, args.seeds)
    feats = prefix_features(rows, base)
    for name, (grid, kind) in GRIDS.items():
        for idf in (True, False):
            print_purity(f"{name} {'idf' if idf else 'no idf'}", feats, labels, grid,
                         RouterConfig(idf=idf, kind=kind), args.seeds)
    for steps in (0, args.model_steps):
        hidden = model_features(rows, train, steps, base.prefix_tokens)
        dense = RouterConfig(idf=False, dim=hidden.shape[1])
        print_purity(f"base model, {steps} steps, flat", hidden, labels, flat, dense,
                     args.seeds)
    rng = np.random.default_rng(0)
    chance = [purity(rng.integers(0, 4, len(rows)).tolist(), labels) for _ in range(args.seeds)]
    print(f"  random paths (baseline)  purity {np.mean(chance):.3f}")


if __name__ == "__main__":
    main()
