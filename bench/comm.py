"""Bytes on the wire against quality: data-parallel training vs DiLoCo with compression.

Four sites, the tiny model, the same token budget for every row:

* data-parallel baseline: every step each site sends its full fp32 gradient and receives the
  averaged one (what synchronous data-parallel training over the internet would move);
* DiLoCo (H inner steps per round) with fp32 traffic; with int8 updates up and int8 changes
  of the weights down; with int4 updates (+ error feedback) up and int4 changes down.

Every row starts from the same warm model (``--warm`` data-parallel steps from scratch, as
DiLoCo's comparisons start from a pretrained model) and trains the same tokens. Prints the
final mean validation loss and the bytes on the wire of each (the starting model reaches
every site once whatever the method, and is not counted), and the reduction against the
baseline. ``--mixed`` gives every site an equal share of all
four domains (IID); the default is the demo's one-domain-per-site split (non-IID).

    python bench/comm.py [--steps 600] [--h 150] [--batch 8] [--warm 300] [--mixed]
                         [--outer fedavg|diloco]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from atoll.config import from_dict
from atoll.data.demo import build_demo_data, build_mixed_sites
from atoll.federation.protocol import tensor_bytes
from atoll.metrics import read_metrics
from atoll.model import ModelConfig, export
from atoll.run_config import RunConfig
from atoll.simulate import simulate
from atoll.tokenizer import load_tokenizer
from atoll.train.centralised import CentralisedBaseline
from atoll.train.inner import InnerConfig

OUTER = {"fedavg": {"lr": 1.0, "momentum": 0.0, "nesterov": False},
         "diloco": {"lr": 0.7, "momentum": 0.9, "nesterov": True},
         # extrapolate: the mean of k small-batch trajectories is shorter than one
         # large-batch trajectory of the same steps (their noise cancels)
         "sgd2": {"lr": 2.0, "momentum": 0.0, "nesterov": False},
         "nesterov": {"lr": 1.0, "momentum": 0.5, "nesterov": True}}


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def warm_start(dirs: list[Path], steps: int, batch: int, out: Path) -> Path:
    """Centralised data-parallel training for ``steps`` steps from scratch, exported as the
    model every variant starts from (DiLoCo's comparisons start from a warm model too)."""
    tok = load_tokenizer("")
    model = ModelConfig().build(tok, seed=0)
    inner = InnerConfig(lr=3e-3, warmup_steps=20, batch_size=batch)
    warm = CentralisedBaseline("data_parallel", model, inner, dirs, 128, seed=1,
                               total_steps=steps)
    warm.train_to(warm.tokens_per_step * steps)
    return export(model, tok, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600, help="inner steps per site in all")
    ap.add_argument("--h", type=int, default=150, help="inner steps per round")
    ap.add_argument("--batch", type=int, default=8, help="rows of 128 tokens per step")
    ap.add_argument("--warm", type=int, default=300, help="data-parallel steps to start from")
    ap.add_argument("--mixed", action="store_true", help="IID sites (all domains each)")
    ap.add_argument("--outer", choices=OUTER, default="fedavg")
    ap.add_argument("--only-fp32", action="store_true", help="skip the compressed rows")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="atoll-comm-"))
    tokens = (args.steps + args.warm) * args.batch * 128
    if args.mixed:
        dirs = build_mixed_sites(tmp, 4, int(tokens * 1.2), log=lambda s: None)
        sites = {f"site{i}": d for i, d in enumerate(dirs)}
    else:
        sites = build_demo_data(tmp, tokens_per_domain=int(tokens * 1.2), log=lambda s: None)
    start = time.perf_counter()
    warm = warm_start(list(sites.values()), args.warm, args.batch, tmp / "warm") \
        if args.warm else None

    def config(h: int, up: dict, down: dict, baseline: bool) -> RunConfig:
        return from_dict(RunConfig, {
            "name": "comm", "seed": 0,
            "model": {"path": str(warm), "pretrained": True} if warm else {},
            "inner": {"lr": 3e-3, "warmup_steps": 20, "batch_size": args.batch,
                      "total_steps": args.steps},
            "outer": OUTER[args.outer],
            "federation": {"rounds": args.steps // h, "steps_per_round": h},
            "eval": {"every": 10_000, "max_batches": 8}, "credit": {"batches": 0},
            "baseline": {"kinds": ["data_parallel"] if baseline else []},
            "comm": {"up": up, "down": down},
            "sites": [{"name": n, "data": str(d)} for n, d in sites.items()]})

    split = "IID (every site holds all four domains)" if args.mixed else \
        "non-IID (one domain per site)"
    print(f"4 sites, {split}; from a model warmed up by {args.warm} data-parallel steps, "
          f"{args.steps} more inner steps per site of {args.batch} x 128 tokens "
          f"({4 * args.steps * args.batch * 128 / 1e6:.2f}M tokens); outer {args.outer}")
    variants = [("fp32", {"kind": "fp32"}, {"kind": "fp32"}),
                ("int8 up, int8 changes down", {"kind": "int8", "error_feedback": False},
                 {"kind": "int8", "delta": True}),
                ("int4 + error feedback up, int4 changes down",
                 {"kind": "int4", "error_feedback": True}, {"kind": "int4", "delta": True})]
    rows = []
    for i, (name, up, down) in enumerate(variants[:1] if args.only_fp32 else variants):
        out = tmp / name.split()[0]
        run = simulate(config(args.h, up, down, baseline=i == 0), out, report=False)
        if i == 0:  # the baseline trains alongside the first variant
            grad = len(tensor_bytes(dict(run.model.named_parameters())))
            dp_bytes = args.steps * 4 * 2 * grad  # each step: 4 gradients up, the mean down
            dp_loss = mean(run.final_losses()["baseline:data_parallel"])
            rows.append(("data-parallel, fp32 gradients every step", dp_loss, dp_bytes))
        # bytes of the rounds; the starting model reached every site once, for every row
        total = sum(r.get("bytes_up", 0) + r.get("bytes_down", 0)
                    for r in read_metrics(out / "metrics.jsonl")
                    if r["kind"] == "round" and r["run"] == "federation")
        first = next(r for r in read_metrics(out / "metrics.jsonl")
                     if r["kind"] == "round" and r["run"] == "federation" and r["round"] == 1)
        total -= first["bytes_down"]
        rows.append((f"DiLoCo H={args.h}, {name}", mean(run.final_losses()["federation"]),
                     total))
        shutil.rmtree(out / "sites", ignore_errors=True)
    print(f"  ({time.perf_counter() - start:.0f}s)")
    print(f"\n{'':60}{'val loss':>9}{'vs DP':>8}{'bytes on wire':>16}{'reduction':>11}")
    for name, loss, total in rows:
        print(f"{name:<60}{loss:9.4f}{(loss / dp_loss - 1) * 100:+7.1f}%"
              f"{total / 1e6:13.1f} MB{dp_bytes / total:10.0f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
