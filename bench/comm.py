"""Bytes on the wire against quality: data-parallel training vs DiLoCo with compression.

Four sites, the tiny model, the same token budget for every row:

* data-parallel baselines: every step each site sends its full fp32 gradient and receives
  the averaged one (what synchronous data-parallel training over the internet would move),
  at a few AdamW learning rates; the best of them is the yardstick;
* DiLoCo (H inner steps per round, outer Nesterov) with fp32 traffic; int8 updates up and
  int8 changes of the weights down; int4 + error feedback up and int4 changes down;
* SparseLoCo: the largest 1/32 of every chunk of 256 entries of each update, in 2 bits, up,
  with error feedback whose residual decays by 0.95 a round (it stands in for outer
  momentum, so the outer step is a plain average), and the largest 3/32 of the change of
  the weights, in 2 bits, down. ``--only`` picks other rows (see ``ROWS``: int2, sign, their
  halves, random places), ``--outer-lr`` and ``--outer-momentum`` change the outer step.

Every row starts from the same warm model (``--warm`` data-parallel steps from scratch, as
DiLoCo's comparisons start from a pretrained model) and trains the same tokens. Prints the
final mean validation loss and the bytes on the wire of each (the starting model reaches
every site once whatever the method, and is not counted), and the reduction against the
data-parallel baseline. Rows are independent runs, ``--jobs`` of them at a time (one
thread each). ``--mixed`` gives every site an equal share of all four domains (IID); the
default is the demo's one-domain-per-site split (non-IID).

    python bench/comm.py --mixed [--steps 2400] [--h 25] [--batch 8] [--warm 300]
                         [--jobs 2] [--only fp32,sparse] [--dp-lrs 2e-3,3e-3]
                         [--lr 3e-3] [--outer diloco|fedavg] [--outer-lr 0.5] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from smoke import parse

from atoll.app.metrics import read_metrics
from atoll.app.run_config import EvalConfig, RunConfig
from atoll.app.simulate import simulate
from atoll.config import from_dict
from atoll.data.demo import build_demo_data, build_mixed_sites
from atoll.federation.protocol import tensor_bytes
from atoll.model import ModelConfig, export
from atoll.tokenizer import load_tokenizer
from atoll.train.baselines import CentralisedBaseline
from atoll.train.evaluate import held_out_batches, validation_loss
from atoll.train.inner import InnerConfig

OUTER = {"fedavg": {"lr": 1.0, "momentum": 0.0, "nesterov": False},
         "diloco": {"lr": 0.7, "momentum": 0.9, "nesterov": True}}

class Row(NamedTuple):
    """A federated row: what it is called, its uplink and downlink codecs, and its outer
    step (None: ``--outer``'s)."""

    label: str
    up: dict
    down: dict
    outer: str | None = None


_SPARSE_UP = {"kind": "int2", "topk": 1 / 32, "error_feedback": True}
# SparseLoCo: the decayed residual stands in for outer momentum, so the outer step is a
# plain average (FedAvg) and the change of the weights is as sparse as the updates
_SPARSELOCO_UP = {**_SPARSE_UP, "feedback_decay": 0.95}
_SIGN_UP = {"kind": "sign", "block": 256, "error_feedback": True}
_SIGN_DOWN = {"kind": "sign", "block": 256, "delta": True}
_RANDOM = {"kind": "int2", "topk": 0.04, "select": "random"}
ROWS = {
    "fp32": Row("fp32 both ways", {"kind": "fp32"}, {"kind": "fp32"}),
    "int8": Row("int8 up, int8 changes down", {"kind": "int8", "error_feedback": False},
                {"kind": "int8", "delta": True}),
    "int4": Row("int4 + error feedback up, int4 changes down",
                {"kind": "int4", "error_feedback": True}, {"kind": "int4", "delta": True}),
    "int2": Row("int2 + error feedback up, int2 changes down",
                {"kind": "int2", "error_feedback": True}, {"kind": "int2", "delta": True}),
    # blocks of 128: 2.25 bits a value each way instead of 2.5 (1000x then needs H >= 71)
    "int2-128": Row("int2/128 + error feedback up, int2/128 changes down",
                    {"kind": "int2", "block": 128, "error_feedback": True},
                    {"kind": "int2", "block": 128, "delta": True}),
    # one bit a value, blocks of 256 (+ a 4-byte scale each): 1.125 bits a value each way
    "sign": Row("sign/256 + error feedback up, sign/256 changes down", _SIGN_UP, _SIGN_DOWN),
    # what each half of "sign" costs
    "sign-up": Row("sign/256 + error feedback up, fp32 weights down", _SIGN_UP, {"kind": "fp32"}),
    "sign-down": Row("fp32 up, sign/256 changes down", {"kind": "fp32"}, _SIGN_DOWN),
    "sparse": Row("top 1/32 int2 + EF up, top 3/32 int2 changes down", _SPARSE_UP,
                  {"kind": "int2", "topk": 3 / 32, "delta": True}),
    # what each half of "sparse" costs: the same uplink with fp32 weights down; the same
    # 1/32 down as up; random places (shared by the round, no index) instead of the largest
    "sparse-up": Row("top 1/32 int2 + EF up, fp32 weights down", _SPARSE_UP, {"kind": "fp32"}),
    "sparse-even": Row("top 1/32 int2 + EF up, top 1/32 int2 changes down", _SPARSE_UP,
                       {"kind": "int2", "topk": 1 / 32, "delta": True}),
    "random": Row("random 4% int2 + EF up, the same 4% int2 changes down",
                  {**_RANDOM, "error_feedback": True}, {**_RANDOM, "delta": True}),
    "sparseloco": Row("SparseLoCo: top 1/32 int2 + EF x0.95 up, top 3/32 int2 changes down",
                      _SPARSELOCO_UP, {"kind": "int2", "topk": 3 / 32, "delta": True},
                      "fedavg"),
    "sparseloco-up": Row("SparseLoCo: top 1/32 int2 + EF x0.95 up, fp32 weights down",
                         _SPARSELOCO_UP, {"kind": "fp32"}, "fedavg"),
}
OUTER_NAMES = {"diloco": "DiLoCo", "fedavg": "FedAvg outer"}
SMOKE = {"steps": 4, "h": 2, "batch": 2, "warm": 2, "dp_lrs": "3e-3",
         "only": "fp32,sparseloco", "eval_batches": 1, "eval_batch": 2}
# enough text for every site to hold a validation split, however short the run
MIN_TOKENS_PER_SITE = 60_000


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


def data_parallel(dirs: list[Path], warm: Path | None, lr: float, steps: int, batch: int,
                  ev: EvalConfig) -> tuple[float, int]:
    """Final mean validation loss and bytes of data-parallel training for ``steps`` steps
    (each step: every site's fp32 gradient up, the mean down)."""
    torch.set_num_threads(1)
    tok = load_tokenizer("")
    model = ModelConfig(path=str(warm), pretrained=True).build(tok, seed=0) if warm \
        else ModelConfig().build(tok, seed=0)
    inner = InnerConfig(lr=lr, warmup_steps=20, batch_size=batch, total_steps=steps)
    dp = CentralisedBaseline("data_parallel", model, inner, dirs, 128, seed=0,
                             total_steps=steps)
    dp.train_to(dp.tokens_per_step * steps)
    purpose = RunConfig().purpose
    loss = mean({str(d): validation_loss(model, held_out_batches(d, 128, ev.batch_size,
                                                                ev.max_batches, purpose))
                 for d in dirs})
    grad = len(tensor_bytes(dict(model.named_parameters())))
    return loss, steps * len(dirs) * 2 * grad


def diloco(sites: dict[str, Path], warm: Path | None, codec: str, outer: dict, lr: float,
           h: int, steps: int, batch: int, ev: EvalConfig, out: Path) -> tuple[float, int]:
    """Final mean validation loss and bytes on the wire of one federated run (``outer``:
    the outer step's settings)."""
    row = ROWS[codec]
    cfg = from_dict(RunConfig, {
        "name": "comm", "seed": 0, "threads": 1,
        "model": {"path": str(warm), "pretrained": True} if warm else {},
        "inner": {"lr": lr, "warmup_steps": 20, "batch_size": batch, "total_steps": steps},
        "outer": outer,
        "federation": {"rounds": steps // h, "steps_per_round": h},
        "eval": asdict(ev), "credit": {"batches": 0},
        "baseline": {"kinds": []}, "checkpoint": {"every": 10_000},
        "comm": {"up": row.up, "down": row.down},
        "sites": [{"name": n, "data": str(d)} for n, d in sites.items()]})
    run = simulate(cfg, out, report=False)
    rounds = [r for r in read_metrics(out / "metrics.jsonl")
              if r["kind"] == "round" and r["run"] == "federation"]
    # bytes of the rounds; the starting model reached every site once, for every row
    total = sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
    total -= next(r for r in rounds if r["round"] == 1)["bytes_down"]
    loss = mean(run.final_losses()["federation"])
    shutil.rmtree(out, ignore_errors=True)
    return loss, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2400, help="inner steps per site in all")
    ap.add_argument("--h", type=int, default=25, help="inner steps per round")
    ap.add_argument("--batch", type=int, default=8, help="rows of 128 tokens per step")
    ap.add_argument("--warm", type=int, default=300, help="data-parallel steps to start from")
    ap.add_argument("--lr", type=float, default=3e-3, help="the sites' AdamW learning rate")
    ap.add_argument("--dp-lrs", default="3e-3,6e-3",
                    help="learning rates of the data-parallel baselines (the best counts)")
    ap.add_argument("--mixed", action="store_true", help="IID sites (all domains each)")
    ap.add_argument("--outer", choices=OUTER, default="diloco")
    ap.add_argument("--outer-lr", type=float, help="override the --outer step's lr")
    ap.add_argument("--outer-momentum", type=float,
                    help="override the --outer step's momentum (Nesterov when above 0)")
    ap.add_argument("--only", default="fp32,int8,int4,sparseloco",
                    help=f"federated rows to run, of {','.join(ROWS)}")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches per site")
    ap.add_argument("--eval-batch", type=int, default=16, help="rows per validation batch")
    args = parse(ap, SMOKE)
    # both kinds of row are evaluated on the same held-out batches of every site
    ev = EvalConfig(every=10_000, max_batches=args.eval_batches, batch_size=args.eval_batch)
    # the overrides change the outer step of the rows that use --outer's, not of the rows
    # that name their own (SparseLoCo's plain average)
    outer = dict(OUTER[args.outer])
    if args.outer_lr is not None:
        outer["lr"] = args.outer_lr
    if args.outer_momentum is not None:
        outer.update(momentum=args.outer_momentum, nesterov=args.outer_momentum > 0)
    tmp = Path(tempfile.mkdtemp(prefix="atoll-comm-"))
    tokens = max(int((args.steps + args.warm) * args.batch * 128 * 1.2), MIN_TOKENS_PER_SITE)
    if args.mixed:
        dirs = build_mixed_sites(tmp, 4, tokens, log=lambda s: None)
        sites = {f"site{i}": d for i, d in enumerate(dirs)}
    else:
        sites = build_demo_data(tmp, tokens_per_domain=tokens, log=lambda s: None)
    start = time.perf_counter()
    warm = warm_start(list(sites.values()), args.warm, args.batch, tmp / "warm") \
        if args.warm else None
    split = "IID (every site holds all four domains)" if args.mixed else \
        "non-IID (one domain per site)"
    print(f"4 sites, {split}; from a model warmed up by {args.warm} data-parallel steps, "
          f"{args.steps} more inner steps per site of {args.batch} x 128 tokens "
          f"({4 * args.steps * args.batch * 128 / 1e6:.2f}M tokens); DiLoCo: H={args.h}, "
          f"outer {args.outer} {outer}, inner lr {args.lr:g}", flush=True)
    dp_lrs = [float(x) for x in args.dp_lrs.split(",")]
    codecs = [c for c in args.only.split(",") if c]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        dp = {lr: pool.submit(data_parallel, list(sites.values()), warm, lr, args.steps,
                              args.batch, ev) for lr in dp_lrs}
        fed = {c: pool.submit(diloco, sites, warm, c,
                              OUTER[ROWS[c].outer] if ROWS[c].outer else outer,
                              args.lr, args.h, args.steps, args.batch, ev, tmp / c)
               for c in codecs}
        names = {**{f: f"data-parallel lr {lr:g}" for lr, f in dp.items()},
                 **{f: c for c, f in fed.items()}}
        for f in as_completed(names):  # long runs: say what has finished
            print(f"  {names[f]} done ({time.perf_counter() - start:.0f}s)", flush=True)
        dp_rows = {lr: f.result() for lr, f in dp.items()}
        fed_rows = {c: f.result() for c, f in fed.items()}
    print(f"  ({time.perf_counter() - start:.0f}s)")
    best = min(dp_rows, key=lambda lr: dp_rows[lr][0])
    dp_loss, dp_bytes = dp_rows[best]
    rows = [(f"data-parallel, fp32 gradients every step, lr {lr:g}"
             + (" (the baseline)" if lr == best else ""), *dp_rows[lr]) for lr in dp_lrs]
    rows += [(f"{OUTER_NAMES[ROWS[c].outer or args.outer]} H={args.h}, {ROWS[c].label}",
              *fed_rows[c]) for c in codecs]
    print(f"\n{'':84}{'val loss':>9}{'vs DP':>8}{'bytes on wire':>16}{'reduction':>11}")
    for name, loss, total in rows:
        print(f"{name:<84}{loss:9.4f}{(loss / dp_loss - 1) * 100:+7.1f}%"
              f"{total / 1e6:13.1f} MB{dp_bytes / total:10.0f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
