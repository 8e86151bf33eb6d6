"""The demo's settings frontier: validation loss against bytes on the wire.

Same data, model and tokens for every row (the demo's four non-IID sites, the demo's
config); only the inner steps per round (H), the codecs and the outer optimizer change.
Each row prints the federation's final mean validation loss against the data-parallel
baseline at equal tokens (trained once), the bytes the federation moved (up + down, every
site) and how many times fewer that is than data-parallel training would have moved
(:func:`atoll.capacity.wire.data_parallel_bytes`: a ring all-reduce of fp32 gradients
among the four sites after every step).

    python bench/demo_frontier.py [--steps 120] [--only H3-int8,H4-int8] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

from smoke import parse

from atoll.app.metrics import mean_loss
from atoll.app.run_config import load_run_config
from atoll.app.simulate import simulate
from atoll.capacity.wire import data_parallel_bytes
from atoll.data.demo import build_demo_data
from atoll.model import count_parameters
from atoll.tokenizer import load_tokenizer

FEDAVG = ["outer.optimizer=sgd", "outer.lr=1.0", "outer.momentum=0.0", "outer.nesterov=false"]


def codecs(up: str, down: str, delta: bool = True) -> list[str]:
    """Overrides for an uplink codec with error feedback and a downlink codec."""
    return [f"comm.up.kind={up}", "comm.up.error_feedback=true", f"comm.down.kind={down}",
            f"comm.down.delta={'true' if delta and down != 'fp32' else 'false'}"]


VARIANTS: dict[str, tuple[int, list[str]]] = {
    "H3-fp32": (3, FEDAVG + codecs("fp32", "fp32")),
    "H3-int8": (3, FEDAVG + codecs("int8", "int8")),
    "H4-int8": (4, FEDAVG + codecs("int8", "int8")),
    "H6-int8": (6, FEDAVG + codecs("int8", "int8")),
    "H3-int4": (3, FEDAVG + codecs("int4", "int4")),
    "H4-int4": (4, FEDAVG + codecs("int4", "int4")),
    "H4-int4-nesterov": (4, ["outer.optimizer=sgd", "outer.lr=0.8", "outer.momentum=0.3",
                             "outer.nesterov=true"] + codecs("int4", "int4")),
    "H4-int4up-int8down": (4, FEDAVG + codecs("int4", "int8")),
    "H2-int4": (2, FEDAVG + codecs("int4", "int4")),
    "H2-int2up-int4down": (2, FEDAVG + codecs("int2", "int4")),
    "H3-int4-sgd-lr1.2": (3, ["outer.optimizer=sgd", "outer.lr=1.2", "outer.momentum=0.0",
                              "outer.nesterov=false"] + codecs("int4", "int4")),
    "H3-int4-sgd-lr0.8": (3, ["outer.optimizer=sgd", "outer.lr=0.8", "outer.momentum=0.0",
                              "outer.nesterov=false"] + codecs("int4", "int4")),
    "H3-int2up-int4down": (3, FEDAVG + codecs("int2", "int4")),
    "H4-int2up-int4down": (4, FEDAVG + codecs("int2", "int4")),
}
SMOKE = {"steps": 4, "batch": 1, "eval_batches": 1, "only": "H3-int8,H4-int4"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120, help="inner steps per site")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--batch", type=int, default=16,
                    help="rows of 128 tokens per step and per validation batch")
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches per site")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (baseline included)")
    ap.add_argument("--baseline", type=float, default=0.0,
                    help="the data-parallel baseline's loss for these settings, if measured")
    args = parse(ap, SMOKE)
    tmp = Path(tempfile.mkdtemp(prefix="atoll-frontier-"))
    data = tmp / "data"
    build_demo_data(data, log=lambda s: None)
    print(f"{args.steps} inner steps per site, batch {args.batch} x 128, four sites")
    with resources.as_file(resources.files("atoll") / "configs" / "demo.toml") as path:
        def run(name: str, h: int, overrides: list[str], baseline: bool) -> tuple[dict, object]:
            rounds = max(1, args.steps // h)
            cfg = load_run_config(path, [
                f"federation.rounds={rounds}", f"federation.steps_per_round={h}",
                f"eval.every={rounds}", f"eval.max_batches={args.eval_batches}",
                f"inner.batch_size={args.batch}", f"eval.batch_size={args.batch}",
                "baseline.kinds=" + ("['data_parallel']" if baseline else "[]"), *args.set,
                *overrides],
                base=data)
            start = time.perf_counter()
            r = simulate(cfg, tmp / name, report=False)
            shutil.rmtree(tmp / name / "sites", ignore_errors=True)
            out = {k: mean_loss(v) for k, v in r.final_losses().items()}
            out["seconds"] = time.perf_counter() - start
            return out, r

        if args.baseline:  # measured before for these steps (deterministic for the seed)
            base = args.baseline
            cfg = load_run_config(path, [], base=data)
            params = count_parameters(cfg.model.build(load_tokenizer(cfg.tokenizer)))
        else:
            res, r = run("baseline", args.steps, FEDAVG, baseline=True)
            base = res["baseline:data_parallel"]
            params = count_parameters(r.model)
        dp = data_parallel_bytes(params, sites=4, steps=args.steps)
        print(f"{'data-parallel baseline':<22} {base:.4f}  {dp / 1e6:8.1f} MB on the wire")
        for name in args.only.split(",") if args.only else VARIANTS:
            h, overrides = VARIANTS[name]
            res, r = run(name, h, overrides, baseline=False)
            fed, moved = res["federation"], r.bytes_up + r.bytes_down
            print(f"{name:<22} {fed:.4f}  {(fed / base - 1) * 100:+6.1f}% vs data-parallel  "
                  f"{moved / 1e6:8.1f} MB  {dp / moved:6.1f}x fewer bytes  "
                  f"({args.steps // h} rounds, {res['seconds']:.0f}s)", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
