"""Site trainer overhead: tokens/s of a whole ``Site.run`` round against a bare PyTorch loop.

Both train the same model on the same batches in the same process, alternating A/B/A/B so
that machine noise hits both alike; the figure is the ratio of medians.

    python bench/overhead.py [--steps 50] [--reps 3] [--batch 16] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from atoll.data.demo import build_demo_data
from atoll.data.reader import PackedReader, TokenDataset
from atoll.federation.protocol import RoundPlan
from atoll.federation.site import Site, data_seed
from atoll.model import ModelConfig, count_parameters
from atoll.tokenizer import byte_tokenizer
from atoll.train.inner import InnerConfig


def bare_loop(model: torch.nn.Module, batches: list[torch.Tensor], lr: float) -> float:
    """forward, backward, AdamW step: nothing else. Returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    start = time.perf_counter()
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="atoll-bench-"))
    data = build_demo_data(tmp / "data", tokens_per_domain=600_000, seq_len=args.seq_len,
                           log=lambda s: None)["speeches"]
    tok = byte_tokenizer()
    model = ModelConfig(preset="tiny").build(tok, seed=0)
    inner = InnerConfig(lr=3e-3, batch_size=args.batch, warmup_steps=0)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    site = Site("bench", data, tmp / "state")
    total = args.steps * (2 * args.reps + 1)
    print(f"tiny model: {count_parameters(model):,} parameters; batch {args.batch} x "
          f"{args.seq_len}; {args.steps} steps per measurement; {torch.get_num_threads()} threads")

    # The bare loop reads the very batches the site will read, in the same order.
    reader = PackedReader(TokenDataset(data, "train", args.seq_len), args.batch,
                          seed=data_seed(0, "bench"))
    batches = [reader.next_batch() for _ in range(total)]

    def site_round(r: int) -> float:
        plan = RoundPlan(run_id="bench", round=r, site="bench", step=(r - 1) * args.steps,
                         total_steps=total, max_steps=args.steps, time_budget_s=0.0, seed=0,
                         inner=asdict(inner), model_config=model.config.to_dict(),
                         seq_len=args.seq_len, weights=weights)
        start = time.perf_counter()
        site.run(plan)
        return time.perf_counter() - start

    site_round(1)  # warm-up: builds the site's model, first allocations
    site_times, bare_times = [], []
    for rep in range(args.reps):
        site_times.append(site_round(rep + 2))
        chunk = batches[(rep + 1) * args.steps : (rep + 2) * args.steps]
        bare_times.append(bare_loop(model, chunk, inner.lr))
    tokens = args.steps * args.batch * args.seq_len
    site_tps = tokens / statistics.median(site_times)
    bare_tps = tokens / statistics.median(bare_times)
    print(f"site trainer (Site.run, whole round): {site_tps:10,.0f} tokens/s")
    print(f"bare PyTorch loop:                    {bare_tps:10,.0f} tokens/s")
    print(f"ratio site / bare: {site_tps / bare_tps:.3f}")


if __name__ == "__main__":
    main()
