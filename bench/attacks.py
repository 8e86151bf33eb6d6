"""Hostile sites against aggregation rules, and what differential privacy costs.

Attacks: five IID sites (each holds a share of all four demo domains), one of them hostile:
it sends its pseudo-gradient sign-flipped and scaled x10, or scaled x100 (a site behaviour,
``[[sites]] fault``, signed like an honest update). Every cell is the final mean validation
loss; the first row is the clean run of the same rule. The norm check (reject an update over
10x the recent median norm) is off except in the column that says so, so each rule is seen
on its own.

Privacy (``--dp``): the demo's four sites with site-level DP (clip each update, Gaussian
noise on the sum); prints the final loss and the (epsilon, delta) spent for a few noise
multipliers.

    python bench/attacks.py [--rounds 10] [--h 10] [--dp] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from smoke import parse

from atoll.app.metrics import read_metrics
from atoll.app.run_config import RunConfig
from atoll.app.simulate import simulate
from atoll.config import from_dict
from atoll.data.demo import build_demo_data, build_mixed_sites

RULES = [("mean", "mean", 0.0), ("mean + norm check", "mean", 10.0),
         ("median", "median", 0.0), ("trimmed mean", "trimmed_mean", 0.0),
         ("centered clip", "centered_clip", 0.0)]
ATTACKS = [("clean", ""), ("sign flip x10", "sign_flip"), ("scaled x100", "scale100")]
SMOKE = {"rounds": 1, "h": 1, "batch": 2, "eval_batches": 1, "eval_batch": 2, "dp": True,
         "dp_rounds": 1, "dp_batch": 2, "sigmas": "0,0.1", "demo_tokens": 40_000,
         "faults": "sign_flip"}
# enough text for every site to hold a validation split, however short the run
MIN_TOKENS_PER_SITE = 60_000


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def attacks(args: argparse.Namespace, tmp: Path) -> None:
    tokens = args.rounds * args.h * args.batch * 128
    dirs = build_mixed_sites(tmp, 5, max(int(tokens * 1.3), MIN_TOKENS_PER_SITE),
                             log=lambda s: None)
    print(f"5 IID sites, {args.rounds} rounds x {args.h} steps of {args.batch} x 128 tokens, "
          f"FedAvg outside; site4 hostile. Final mean validation loss:\n")
    print(f"{'':16}" + "".join(f"{name:>20}" for name, _, _ in RULES))
    results: dict[str, list[float]] = {}
    faults = set(args.faults.split(","))
    for attack, fault in [a for a in ATTACKS if not a[1] or a[1] in faults]:
        row = []
        for _, rule, ratio in RULES:
            cfg = from_dict(RunConfig, {
                "name": "attacks", "seed": 0,
                "inner": {"lr": 3e-3, "warmup_steps": 10, "batch_size": args.batch},
                "outer": {"lr": 1.0, "momentum": 0.0, "nesterov": False},
                "federation": {"rounds": args.rounds, "steps_per_round": args.h},
                "aggregation": {"rule": rule}, "checks": {"max_norm_ratio": ratio},
                "eval": {"every": 10_000, "max_batches": args.eval_batches,
                         "batch_size": args.eval_batch},
                "credit": {"batches": 0}, "baseline": {"kinds": []},
                "sites": [{"name": f"site{i}", "data": str(d),
                           "fault": fault if i == 4 else ""} for i, d in enumerate(dirs)]})
            out = tmp / f"{fault or 'clean'}-{rule}-{ratio:g}"
            run = simulate(cfg, out, report=False)
            row.append(mean(run.final_losses()["federation"]))
            shutil.rmtree(out, ignore_errors=True)
        results[attack] = row
        print(f"{attack:<16}" + "".join(f"{v:20.4f}" for v in row), flush=True)
    clean = results["clean"]
    print("\nvs the clean run of the same rule:")
    for attack in list(results)[1:]:
        print(f"{attack:<16}" + "".join(f"{(v / c - 1) * 100:+19.1f}%"
                                        for v, c in zip(results[attack], clean, strict=True)))


def privacy(args: argparse.Namespace, tmp: Path) -> None:
    sites = build_demo_data(tmp / "demo", tokens_per_domain=args.demo_tokens,
                            log=lambda s: None)
    rounds = args.dp_rounds
    print(f"\nThe demo's 4 sites, {rounds} rounds x 3 steps, site-level DP (clip "
          f"{args.clip}, delta 1e-5):\n")
    print(f"{'noise multiplier':>18}{'epsilon':>12}{'val loss':>10}{'vs no DP':>10}")
    base = None
    for sigma in [float(x) for x in args.sigmas.split(",")]:
        cfg = from_dict(RunConfig, {
            "name": "dp", "seed": 0,
            "inner": {"lr": 3e-3, "warmup_steps": 20, "batch_size": args.dp_batch},
            "outer": {"lr": 1.0, "momentum": 0.0, "nesterov": False},
            "federation": {"rounds": rounds, "steps_per_round": 3},
            "privacy": {"noise_multiplier": sigma, "clip": args.clip, "delta": 1e-5},
            "eval": {"every": 10_000, "max_batches": args.eval_batches,
                     "batch_size": args.eval_batch},
            "credit": {"batches": 0}, "baseline": {"kinds": []},
            "sites": [{"name": n, "data": str(d)} for n, d in sites.items()]})
        out = tmp / f"dp-{sigma:g}"
        run = simulate(cfg, out, report=False)
        loss = mean(run.final_losses()["federation"])
        base = base or loss
        eps = [r.get("epsilon") for r in read_metrics(out / "metrics.jsonl")
               if r["kind"] == "round" and r["run"] == "federation" and r["round"] > 0][-1]
        eps_text = "inf" if eps is None else f"{eps:.3g}"
        print(f"{sigma:18g}{eps_text:>12}{loss:10.4f}{(loss / base - 1) * 100:+9.1f}%",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--h", type=int, default=10, help="inner steps per round")
    ap.add_argument("--dp", action="store_true", help="also the privacy table")
    ap.add_argument("--clip", type=float, default=1.0, help="DP: L2 bound per update")
    ap.add_argument("--no-attacks", action="store_true")
    ap.add_argument("--faults", default=",".join(f for _, f in ATTACKS if f),
                    help="attacks to run (besides the clean run)")
    ap.add_argument("--batch", type=int, default=8, help="attacks: rows of 128 tokens a step")
    ap.add_argument("--eval-batches", type=int, default=4, help="validation batches per site")
    ap.add_argument("--eval-batch", type=int, default=16, help="rows per validation batch")
    ap.add_argument("--dp-rounds", type=int, default=20, help="DP: rounds of 3 steps")
    ap.add_argument("--dp-batch", type=int, default=16, help="DP: rows of 128 tokens a step")
    ap.add_argument("--sigmas", default="0,0.01,0.03,0.1,0.3", help="DP: noise multipliers")
    ap.add_argument("--demo-tokens", type=int, default=400_000,
                    help="DP: tokens of each demo site's data")
    args = parse(ap, SMOKE)
    tmp = Path(tempfile.mkdtemp(prefix="atoll-attacks-"))
    start = time.perf_counter()
    try:
        if not args.no_attacks:
            attacks(args, tmp)
        if args.dp:
            privacy(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
