"""Where the demo's time goes: `atoll demo` from a fresh cache, split by phase.

Runs the real command in this process under cProfile, from an empty data cache (as on a
fresh clone), and attributes its wall time to phases by the cumulative time of the
functions that make them up (the credit probe, which runs inside the coordinator's accept,
is taken out of the coordinator's share: no time is counted twice). Each phase
is also given in bare training steps of the demo's model, measured in the same run (the
baseline: forward, backward, clip, AdamW at the demo's batch), so figures from machines of
different speeds compare. ``--before`` runs the demo as it was configured before (60 rounds
of 3 steps, fp32 both ways, evaluation every 10 rounds) on today's code.

    python bench/demo_phases.py [--before] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import tempfile
import time
from pathlib import Path

import torch
from smoke import parse

from atoll.app.run_config import RunConfig
from atoll.app.step_clock import bare_step_seconds
from atoll.cli.main import main as atoll_main
from atoll.tokenizer import load_tokenizer

# phase -> (file, function) pairs whose cumulative times add up to it
PHASES = {
    "data preparation (four domains)": [("atoll/data/demo.py", "build_demo_data")],
    "bare step and cost estimate": [("atoll/cli/local.py", "print_cost")],
    "sites: inner steps": [("atoll/federation/site.py", "train")],
    "sites: weights in, update out (codecs, signing, state)": [
        ("atoll/federation/site.py", f) for f in ("receive", "pseudo_gradient", "encode",
                                                  "sign")],  # sign() saves the site's state
    "evaluation (sites, baseline)": [("atoll/train/evaluate.py", "loss_and_tokens")],
    "credit probe (valuing updates)": [("atoll/ledger/credit.py", "__call__")],
    "coordinator: checks, aggregation, outer step": [
        ("atoll/federation/coordinator.py", f) for f in ("open_round", "accept", "close")],
    "data-parallel baseline training": [("atoll/train/baselines.py", "train_to")],
    "ledger and checkpoints": [("atoll/app/books.py", "close_round"),
                               ("atoll/app/run.py", "checkpoint")],
    "export, model card, report, sample": [
        ("atoll/app/run.py", "finish"), ("atoll/app/html_report.py", "write_report"),
        ("atoll/model.py", "generate_sample")],
}
BEFORE = ["federation.rounds=60", "eval.every=10", "comm.up.kind=fp32",
          "comm.up.error_feedback=false", "comm.down.kind=fp32", "comm.down.delta=false"]


def phase_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each phase's functions, from a profile."""
    out = dict.fromkeys(PHASES, 0.0)
    for (path, _, func), (_, _, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = path.replace(os.sep, "/")
        for phase, parts in PHASES.items():
            if any(where.endswith(f) and func == fn for f, fn in parts):
                out[phase] += cum
    # the coordinator values each update as it accepts it: the probe runs inside accept()
    out["coordinator: checks, aggregation, outer step"] -= out["credit probe (valuing updates)"]
    return out


def run_demo(overrides: list[str], out: Path) -> tuple[float, dict[str, float], str]:
    """``atoll demo`` under the profiler: wall seconds, seconds per phase, its output."""
    profiler, printed = cProfile.Profile(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        profiler.enable()
        code = atoll_main(["demo", "--out", str(out / "run"), *overrides])
        profiler.disable()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"atoll demo exited {code}:\n{printed.getvalue()[-2000:]}")
    return wall, phase_seconds(pstats.Stats(profiler)), printed.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", action="store_true", help="the demo's previous settings")
    ap.add_argument("--rounds", type=int, default=0, help="override federation.rounds")
    args = parse(ap, {"rounds": 2})
    overrides = BEFORE if args.before else []
    if args.rounds:
        overrides = [o for o in overrides if not o.startswith("federation.rounds")]
        overrides += [f"federation.rounds={args.rounds}", "eval.every=1"]
    cfg = RunConfig()
    torch.set_num_threads(2)
    model = cfg.model.build(load_tokenizer(""), seed=0)
    step = bare_step_seconds(model, 16, 128)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATOLL_CACHE"] = str(Path(tmp) / "cache")  # a fresh clone's empty cache
        wall, phases, printed = run_demo(overrides, Path(tmp))
    done = [line for line in printed.splitlines() if line.startswith("done in")]
    print(f"atoll demo{' (before: ' + ' '.join(BEFORE) + ')' if args.before else ''}"
          f"{' ' + ' '.join(overrides) if args.rounds else ''}")
    print(f"bare training step here (baseline, batch 16 x 128, 2 threads): {step:.3f}s")
    print(f"{'phase':<56} {'seconds':>8} {'share':>6} {'bare steps':>10}")
    for phase, s in [*phases.items(), ("other (imports, start-up, logging)",
                                       wall - sum(phases.values()))]:
        print(f"{phase:<56} {s:>8.1f} {s / wall:>6.1%} {s / step:>10.0f}")
    print(f"{'total wall time (under the profiler)':<56} {wall:>8.1f} {1:>6.0%} "
          f"{wall / step:>10.0f}")
    print(f"the demo's own figure: {done[-1] if done else '?'}")


if __name__ == "__main__":
    main()
