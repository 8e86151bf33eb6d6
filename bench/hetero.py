"""Sites of different speeds: synchronous fixed-step rounds vs time-budget rounds.

Four sites (the demo's domains); three take ``--pace`` seconds per inner step, one takes 4x
as long (emulated hardware: each step is stretched to its pace, so the sites do not compete
for this machine's two cores). They run at the same time (the local engine's parallel mode).

* fixed steps: every site takes H steps per round; the fast ones then wait for the slow one;
* time budget: every site trains for the time the slow one needs for H steps.

Both get the same number of rounds, i.e. the same wall time. Prints the federation's tokens
per second as a fraction of the sum of the sites' standalone throughputs, and the final
mean validation loss.

    python bench/hetero.py [--pace 0.2] [--h 10] [--rounds 8] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from one_site import OneSite
from smoke import parse

from atoll.app.metrics import read_metrics
from atoll.app.run_config import RunConfig
from atoll.app.simulate import simulate
from atoll.config import from_dict
from atoll.data.demo import DOMAINS, build_demo_data

BATCH, SEQ = 8, 64
SMOKE = {"pace": 0.02, "h": 2, "rounds": 2, "tokens": 40_000, "eval_batches": 1}


def standalone_tokens_per_s(domain: str, data: Path, pace: float, steps: int, tmp: Path
                            ) -> float:
    """One site alone, training ``steps`` steps at ``pace`` (one round, model building
    included, as a site's first round in the federation)."""
    name = f"alone-{domain}"
    cfg = from_dict(RunConfig, {
        "name": name, "seed": 0, "data": {"seq_len": SEQ}, "inner": {"batch_size": BATCH},
        "federation": {"rounds": 1, "steps_per_round": steps},
        "eval": {"every": 10_000, "max_batches": 1}, "credit": {"batches": 0},
        "baseline": {"kinds": []},
        "sites": [{"name": "alone", "data": str(data), "pace_s": pace}]})
    one = OneSite(cfg, tmp / name)
    try:
        update, seconds = one.round()
    finally:
        one.close()
    return update.tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pace", type=float, default=0.2, help="seconds per step, fast sites")
    ap.add_argument("--h", type=int, default=10, help="steps per round of the slow site")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=400_000, help="tokens of data per site")
    ap.add_argument("--eval-batches", type=int, default=4, help="validation batches per site")
    args = parse(ap, SMOKE)
    tmp = Path(tempfile.mkdtemp(prefix="atoll-hetero-"))
    data = build_demo_data(tmp / "data", tokens_per_domain=args.tokens, seq_len=SEQ,
                           log=lambda s: None)
    paces = {d: args.pace * (4 if d == "code" else 1) for d in DOMAINS}
    alone = {d: standalone_tokens_per_s(d, data[d], paces[d], args.h, tmp) for d in DOMAINS}
    total_alone = sum(alone.values())
    print("standalone tokens/s: " + ", ".join(f"{d} {v:,.0f}" for d, v in alone.items())
          + f"; sum {total_alone:,.0f}")
    budget = args.h * paces["code"]

    def run(name: str, federation: dict) -> None:
        cfg = from_dict(RunConfig, {
            "name": name, "seed": 0, "parallel": True,
            "data": {"seq_len": SEQ}, "inner": {"batch_size": BATCH, "warmup_steps": 5,
                                                 "total_steps": args.rounds * args.h * 4},
            "outer": {"lr": 1.0, "momentum": 0.0, "nesterov": False},
            "federation": {"rounds": args.rounds, **federation},
            "eval": {"every": 10_000, "max_batches": args.eval_batches}, "credit": {"batches": 0},
            "baseline": {"kinds": []},
            "sites": [{"name": d, "data": str(data[d]), "pace_s": paces[d]} for d in DOMAINS]})
        start = time.perf_counter()
        r = simulate(cfg, tmp / name, report=False)
        wall = time.perf_counter() - start
        rounds = [x for x in read_metrics(tmp / name / "metrics.jsonl")
                  if x["kind"] == "round" and x["round"] > 0]
        in_rounds = sum(x["seconds"] for x in rounds)
        tokens = r.coordinator.tokens
        loss = sum(r.final_losses()["federation"].values()) / 4
        print(f"{name:<28} {tokens / in_rounds / total_alone:6.2f} of the sum in rounds "
              f"({tokens / wall / total_alone:.2f} of the whole run's wall time)  "
              f"{tokens / 1e6:.2f}M tokens  val loss {loss:.4f}")

    print(f"one site (code) is 4x slower; {args.rounds} rounds of {budget:.1f}s each")
    run("fixed steps (synchronous)", {"steps_per_round": args.h})
    run("time budget", {"steps_per_round": 0, "time_budget_s": budget})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
