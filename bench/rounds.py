"""How often to sync, and with which outer optimizer, on the demo federation.

Same data, model and token budget for every row (the demo's four non-IID sites); only the
inner steps per round (H) and the outer optimizer change. Prints each federation's final mean
validation loss against the data-parallel baseline at equal tokens, trained once.

    python bench/rounds.py [--tokens-millions 1.64] [--only H3-fedavg,H5-fedavg] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

from smoke import parse

from atoll.app.run_config import load_run_config
from atoll.app.simulate import simulate
from atoll.data.demo import build_demo_data

FEDAVG = ["outer.lr=1.0", "outer.momentum=0.0", "outer.nesterov=false"]
NESTEROV = ["outer.lr=0.7", "outer.momentum=0.9", "outer.nesterov=true"]
VARIANTS = {
    "H25-fedavg": (25, FEDAVG),
    "H10-fedavg": (10, FEDAVG),
    "H5-fedavg": (5, FEDAVG),
    "H5-nesterov-0.7-0.9": (5, NESTEROV),
    "H5-nesterov-1.0-0.5": (5, ["outer.lr=1.0", "outer.momentum=0.5", "outer.nesterov=true"]),
    "H5-sgd-lr1.3": (5, ["outer.lr=1.3", "outer.momentum=0.0", "outer.nesterov=false"]),
    "H4-fedavg": (4, FEDAVG),
    "H3-fedavg": (3, FEDAVG),
}
SMOKE = {"tokens_millions": 0.0052, "batch": 1, "eval_batches": 1,
         "only": "H3-fedavg,H5-nesterov-0.7-0.9"}


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens-millions", type=float, default=1.6384)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--batch", type=int, default=16,
                    help="rows of 128 tokens per step and per validation batch")
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches per site")
    args = parse(ap, SMOKE)
    tmp = Path(tempfile.mkdtemp(prefix="atoll-rounds-"))
    data = tmp / "data"
    build_demo_data(data, log=lambda s: None)
    per_site_step = args.batch * 128 * 4  # batch x seq_len x sites
    total_steps = round(args.tokens_millions * 1e6 / per_site_step)
    print(f"{args.tokens_millions:.2f}M tokens: {total_steps} inner steps per site")
    with resources.as_file(resources.files("atoll") / "configs" / "demo.toml") as path:
        def run(name: str, h: int, outer: list[str], baseline: bool) -> dict:
            rounds = total_steps // h
            cfg = load_run_config(path, [
                f"federation.rounds={rounds}", f"federation.steps_per_round={h}",
                f"eval.every={rounds}", f"eval.max_batches={args.eval_batches}",
                f"inner.batch_size={args.batch}", f"eval.batch_size={args.batch}",
                "baseline.kinds=" + ("['data_parallel']" if baseline else "[]"), *outer],
                base=data)
            start = time.perf_counter()
            r = simulate(cfg, tmp / name, report=False)
            shutil.rmtree(tmp / name / "sites", ignore_errors=True)
            out = {k: mean(v) for k, v in r.final_losses().items()}
            out["seconds"] = time.perf_counter() - start
            return out

        base = run("baseline", total_steps, FEDAVG, baseline=True)["baseline:data_parallel"]
        print(f"{'data-parallel baseline':<24} {base:.4f}")
        names = args.only.split(",") if args.only else list(VARIANTS)
        for name in names:
            h, outer = VARIANTS[name]
            res = run(name, h, outer, baseline=False)
            fed = res["federation"]
            print(f"{name:<24} {fed:.4f}  {(fed / base - 1) * 100:+6.1f}% vs data-parallel  "
                  f"({total_steps // h} rounds, {res['seconds']:.0f}s)", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
