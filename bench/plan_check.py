"""The capacity planner beside measured runs on this machine: bytes per round and seconds
per round of a real federation (local engine, the wire form of every message) against
what ``atoll plan`` predicts for the same config.

The planner is given the tokens/s of a bare PyTorch loop (forward, backward, AdamW) on the
same model and batches, measured between the rounds (A/B, so machine noise hits both); the
link is unlimited, so a predicted round is its compute. Bytes: the safetensors payloads
must match exactly; the JSON headers (a loss, timings, a signed receipt) are an estimate.

    python bench/plan_check.py [--presets tiny,small] [--rounds 3] [--steps 10] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from smoke import parse

from atoll.app.run import Run
from atoll.app.run_config import RunConfig
from atoll.capacity.plan import PlanConfig, build
from atoll.cli.plan import run_settings
from atoll.config import from_dict
from atoll.data.demo import build_demo_data
from atoll.data.reader import PackedReader, TokenDataset
from atoll.engines.local import LocalEngine
from atoll.federation.protocol import tensor_bytes
from atoll.federation.site import Site, data_seed

SITE = "speeches"
SMOKE = {"presets": "tiny", "rounds": 2, "steps": 3, "batch": 2, "seq_len": 32,
         "tokens": 40_000, "up": "fp32"}


def config(args: argparse.Namespace, preset: str, data: Path, up: str) -> RunConfig:
    """A federation of one site of ``preset`` with uplink codec ``up``."""
    kind, _, block = up.partition("/")
    return from_dict(RunConfig, {
        "name": "plan-check", "seed": 0, "device": "cpu", "model": {"preset": preset},
        "data": {"seq_len": args.seq_len},
        "inner": {"lr": 3e-3, "batch_size": args.batch, "warmup_steps": 0},
        "federation": {"rounds": args.rounds, "steps_per_round": args.steps},
        "comm": {"up": {"kind": kind, **({"block": int(block)} if block else {})},
                 "down": {"kind": "bf16" if kind != "fp32" else "fp32"}},
        "eval": {"every": 10_000, "max_batches": 1}, "credit": {"batches": 0},
        "baseline": {"kinds": []}, "sites": [{"name": SITE, "data": str(data)}]})


def bare_seconds(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """forward, backward, AdamW step over ``batches``: nothing else."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(cfg: RunConfig, out: Path, data: Path) -> dict[str, list]:
    """Run the rounds; per round: wall seconds, bytes each way (payload, header) and the
    bare loop's seconds on as many steps, measured right after it."""
    run = Run(cfg, out)
    site = Site(SITE, data, run.out / "sites" / SITE, device="cpu")
    engine = LocalEngine([site])
    model = cfg.model.build(run.tokenizer, seed=1)
    reader = PackedReader(TokenDataset(data, "train", cfg.data.seq_len), cfg.inner.batch_size,
                          seed=data_seed(cfg.seed, SITE))
    rows: dict[str, list] = {k: [] for k in ("round_s", "bare_s", "up", "down", "up_blob",
                                              "down_blob")}
    for _ in range(cfg.federation.rounds):
        start = time.perf_counter()
        plans = run.coordinator.open_round([SITE])
        (reply,) = list(engine.exchange(plans))
        run.coordinator.accept(reply)
        run.coordinator.close()
        rows["round_s"].append(time.perf_counter() - start)
        rows["up"].append(reply.bytes_up)
        rows["down"].append(reply.bytes_down)
        rows["up_blob"].append(len(tensor_bytes(reply.delta)))  # what the site sent
        rows["down_blob"].append(len(tensor_bytes(plans[SITE].weights)))
        batches = [reader.next_batch() for _ in range(cfg.federation.steps_per_round)]
        rows["bare_s"].append(bare_seconds(model, batches))
    engine.close()
    run.close()
    return rows


def check(args: argparse.Namespace, preset: str, up: str, data: Path, tmp: Path) -> None:
    """One preset and codec: measured beside predicted, with ratios."""
    cfg = config(args, preset, data, up)
    rows = measure(cfg, tmp / f"run-{preset}-{up.replace('/', '_')}", data)
    later = slice(1, None)  # round 1 builds the site's model and sends it whole
    tokens = cfg.federation.steps_per_round * cfg.inner.batch_size * cfg.data.seq_len
    tps = tokens / statistics.median(rows["bare_s"][later])
    plan = build(PlanConfig(**run_settings(cfg), tokens_per_second=tps, uplink=0.0))
    round_s = statistics.median(rows["round_s"][later])
    up_blob, down_blob = set(rows["up_blob"][later]), set(rows["down_blob"][later])
    print(f"{preset} ({plan.params:,} params), up {plan.cfg.up.spec}, down "
          f"{plan.cfg.down.spec}; {tokens:,} tokens a round; bare loop {tps:,.0f} tokens/s")
    print(f"  payload up   (bytes): measured {sorted(up_blob)}  predicted "
          f"{plan.traffic.up_payload:,.0f}  exact: {up_blob == {plan.traffic.up_payload}}")
    print(f"  payload down (bytes): measured {sorted(down_blob)}  predicted "
          f"{plan.traffic.down_payload:,.0f}  exact: {down_blob == {plan.traffic.down_payload}}")
    up, down = statistics.median(rows["up"][later]), statistics.median(rows["down"][later])
    print(f"  on the wire up/down (with headers): measured {up:,.0f} / {down:,.0f}  "
          f"predicted {plan.traffic.up:,.0f} / {plan.traffic.down:,.0f}  ratio "
          f"{plan.traffic.up / up:.4f} / {plan.traffic.down / down:.4f}")
    print(f"  seconds per round: measured {round_s:.3f}  predicted {plan.round_s:.3f}  "
          f"predicted / measured {plan.round_s / round_s:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--up", default="fp32,int8/64", help="uplink codecs to check")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=400_000, help="tokens of training data")
    args = parse(ap, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="atoll-bench-"))
    try:
        data = build_demo_data(tmp / "data", tokens_per_domain=args.tokens,
                               seq_len=args.seq_len, log=lambda s: None)[SITE]
        print(f"{torch.get_num_threads()} threads; {args.rounds} rounds of {args.steps} "
              f"steps, batch {args.batch} x {args.seq_len}; medians of rounds 2-")
        for preset in args.presets.split(","):
            for up in args.up.split(","):
                check(args, preset, up, data, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
