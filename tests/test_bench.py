"""Every benchmark in bench/ runs in its ``--smoke`` setting, so a change that breaks one
fails the test suite (``make bench`` once crashed on main for weeks without a test noticing).

Each runs as a person runs it, ``python bench/X.py --smoke`` from the repository root, and
must exit 0 and print its figures. Only the labels of the figures are checked: at smoke sizes
the values mean nothing, and most of them are timings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# script -> (extra flags, labels its output must hold)
FAST = {
    "comm.py": (["--mixed"], ["bytes on wire", "reduction", "DiLoCo H=2, fp32 both ways",
                              "SparseLoCo"]),
    "codec_error.py": ([], ["bits/value", "int2/128", "sign/256"]),
    "rounds.py": ([], ["data-parallel baseline", "vs data-parallel"]),
    "overhead.py": ([], ["site trainer (Site.run, whole round)", "bare PyTorch loop",
                         "ratio site / bare"]),
    "hetero.py": ([], ["standalone tokens/s", "of the sum in rounds", "time budget"]),
    "attacks.py": ([], ["centered clip", "vs the clean run of the same rule", "epsilon"]),
}
# real Flower processes: the fast development loop (make check) leaves them out
FLOWER = {
    "wan.py": ([], ["overlap 2 steps", "compute utilisation", "s/round", "segments resent"]),
    "flower_overhead.py": ([], ["ratio Flower / local", "MB each way via messages",
                                "MB each way via file:// store"]),
}
# modules the benchmarks import or start, not benchmarks themselves
HELPERS = {"flower_echo_app.py", "one_site.py", "smoke.py"}


def run_smoke(script: str, extra: list[str]) -> str:
    """``python bench/<script> --smoke``: its output, after checking it exited 0."""
    # One torch thread: with the default of one per core, torch's threads spin against
    # whatever else holds the cores (other tests, other agents) and a step takes 50x longer.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path("bench") / script), "--smoke", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"bench/{script} --smoke exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def check_figures(script: str, extra: list[str], labels: list[str]) -> None:
    out = run_smoke(script, extra)
    missing = [label for label in labels if label not in out]
    assert not missing, f"bench/{script} --smoke printed no {missing}:\n{out}"


@pytest.mark.parametrize("script", sorted(FAST))
def test_benchmark_smoke(script: str) -> None:
    check_figures(script, *FAST[script])


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(FLOWER))
def test_flower_benchmark_smoke(script: str) -> None:
    check_figures(script, *FLOWER[script])


def test_every_benchmark_has_a_smoke_test() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")} - HELPERS
    assert scripts == set(FAST) | set(FLOWER), "a benchmark without a smoke test (or a stale one)"
