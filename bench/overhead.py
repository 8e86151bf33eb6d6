"""Site trainer overhead: tokens/s of a whole ``Site.run`` round against a bare PyTorch loop.

Both train the same model on the same batches in the same process, alternating A/B/A/B so
that machine noise hits both alike; the figure is the ratio of medians. The site's rounds
are planned by a real coordinator (:mod:`one_site`), so a round is what a federation asks
of a site: decode the plan's weights, train, form and encode the pseudo-gradient, save state.

    python bench/overhead.py [--steps 50] [--reps 3] [--batch 16] [--seq-len 128] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from one_site import OneSite
from smoke import parse

from atoll.app.run_config import RunConfig
from atoll.config import from_dict
from atoll.data.demo import build_demo_data
from atoll.data.reader import PackedReader, TokenDataset
from atoll.federation.site import data_seed
from atoll.model import count_parameters
from atoll.tokenizer import byte_tokenizer

SITE = "bench"
SMOKE = {"steps": 3, "reps": 1, "batch": 2, "seq_len": 32, "tokens": 40_000}


def bare_loop(model: torch.nn.Module, batches: list[torch.Tensor], lr: float) -> float:
    """forward, backward, AdamW step: nothing else. Returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    start = time.perf_counter()
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def config(args: argparse.Namespace, data: Path) -> RunConfig:
    """One site, one warm-up round and ``reps`` measured rounds of ``steps`` steps each."""
    return from_dict(RunConfig, {
        "name": "overhead", "seed": 0, "threads": args.threads,
        "data": {"seq_len": args.seq_len},
        "inner": {"lr": 3e-3, "batch_size": args.batch, "warmup_steps": 0},
        "federation": {"rounds": args.reps + 1, "steps_per_round": args.steps},
        "eval": {"every": 10_000, "max_batches": 1}, "credit": {"batches": 0},
        "baseline": {"kinds": []}, "sites": [{"name": SITE, "data": str(data)}]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=600_000, help="tokens of training data")
    args = parse(ap, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="atoll-bench-"))
    try:
        data = build_demo_data(tmp / "data", tokens_per_domain=args.tokens,
                               seq_len=args.seq_len, log=lambda s: None)["speeches"]
        cfg = config(args, data)
        one = OneSite(cfg, tmp / "run")
        model = cfg.model.build(byte_tokenizer(), seed=0)
        print(f"{cfg.model.preset} model: {count_parameters(model):,} parameters; batch "
              f"{args.batch} x {args.seq_len}; {args.steps} steps per measurement; "
              f"{torch.get_num_threads()} threads")
        # The bare loop reads the very batches the site will read, in the same order.
        reader = PackedReader(TokenDataset(data, "train", args.seq_len), args.batch,
                              seed=data_seed(cfg.seed, SITE))
        batches = [reader.next_batch() for _ in range(args.steps * (args.reps + 1))]

        one.round()  # warm-up: builds the site's model, first allocations
        site_times, bare_times = [], []
        for rep in range(args.reps):
            site_times.append(one.round()[1])
            chunk = batches[(rep + 1) * args.steps : (rep + 2) * args.steps]
            bare_times.append(bare_loop(model, chunk, cfg.inner.lr))
        one.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = args.steps * args.batch * args.seq_len
    site_tps = tokens / statistics.median(site_times)
    bare_tps = tokens / statistics.median(bare_times)
    print(f"site trainer (Site.run, whole round): {site_tps:10,.0f} tokens/s")
    print(f"bare PyTorch loop:                    {bare_tps:10,.0f} tokens/s")
    print(f"ratio site / bare: {site_tps / bare_tps:.3f}")


if __name__ == "__main__":
    main()
