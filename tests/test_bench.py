"""Every benchmark in bench/ runs in its ``--smoke`` setting, so a change that breaks one
fails the test suite (``make bench`` once crashed on main for weeks without a test noticing).

Each runs as a person runs it, ``python bench/X.py --smoke`` from the repository root, and
must exit 0 and print its figures. Only the labels of the figures are checked: at smoke sizes
the values mean nothing, and most of them are timings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ONE_AT_A_TIME

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
    "coordinator_memory.py": ([], ["peak RSS", "measured / stated", "bytes/param"]),
    "prepare.py": ([], ["byte-level (uint16)", "70,000 ids (uint32)", "ratio 2 / 1",
                        "peak memory allocated"]),
    "plan_check.py": ([], ["payload up", "exact: True", "predicted / measured"]),
    "demo_frontier.py": ([], ["data-parallel baseline", "vs data-parallel", "x fewer bytes"]),
    "dipaco.py": ([], ["dense tiny (one path's size)", "DiPaCo 2 x 2 (paths of tiny's size)",
                       "dense 8 blocks (the grid's size)", "grid vs dense tiny",
                       "site peak RSS"]),
    "routing.py": ([], ["4 paths (2 x 2), product", "no idf", "restart(s)",
                        "base model, 2 steps", "random paths (baseline)"]),
    "demo_phases.py": ([], ["data preparation", "sites: inner steps", "credit probe",
                            "data-parallel baseline training", "total wall time", "bare steps"]),
    "gpu.py": ([], ["site trainer (InnerTrainer.run)", "bare PyTorch loop", "ratio site / bare",
                    "MFU", "same losses: yes", "7b memory", "the planner's count agrees"]),
}
# real Flower processes: the fast development loop (make check) leaves them out
FLOWER = {
    "wan.py": ([], ["overlap 2 steps", "compute utilisation", "s/round", "segments resent"]),
    "flower_overhead.py": ([], ["ratio Flower / local", "MB each way via messages via gate",
                                "MB each way via file:// store"]),
}
# modules the benchmarks import or start, not benchmarks themselves
HELPERS = {"flower_echo_app.py", "gpu_loops.py", "one_site.py", "peak_memory.py", "smoke.py"}


def run_smoke(script: str, extra: list[str], tmp: Path | None = None) -> str:
    """``python bench/<script> --smoke``: its output, after checking it exited 0 (with
    ``tmp``: its temporary files go there)."""
    # One torch thread: with the default of one per core, torch's threads spin against
    # whatever else holds the cores (other tests, other agents) and a step takes 50x longer.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    proc = subprocess.run([sys.executable, str(Path("bench") / script), "--smoke", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"bench/{script} --smoke exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def check_figures(script: str, extra: list[str], labels: list[str], tmp: Path | None = None
                  ) -> None:
    out = run_smoke(script, extra, tmp)
    missing = [label for label in labels if label not in out]
    assert not missing, f"bench/{script} --smoke printed no {missing}:\n{out}"


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text`` (e.g. a folder they work in)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended meanwhile
            continue
        if text in cmd:
            found.append(cmd)
    return found


# seconds each: the quick loop (make check) runs these; make test runs every benchmark
QUICK = {"codec_error.py", "overhead.py"}


@pytest.mark.parametrize("script", [
    s if s in QUICK else pytest.param(s, marks=pytest.mark.slow) for s in sorted(FAST)])
def test_benchmark_smoke(script: str) -> None:
    check_figures(script, *FAST[script])


@pytest.mark.slow
@ONE_AT_A_TIME
@pytest.mark.parametrize("script", sorted(FLOWER))
def test_flower_benchmark_smoke(script: str) -> None:
    """Also: no SuperLink, SuperNode or site process outlives the benchmark."""
    # a short folder of its own (a site's worker socket lives under it: AF_UNIX paths are
    # short), named in the command lines of everything the benchmark starts
    tmp = Path(tempfile.mkdtemp(prefix="atoll-smoke-"))
    try:
        check_figures(script, *FLOWER[script], tmp=tmp)
        deadline = time.monotonic() + 15  # a killed process takes a moment to go
        while processes_mentioning(str(tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_mentioning(str(tmp)) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_every_benchmark_has_a_smoke_test() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")} - HELPERS
    assert scripts == set(FAST) | set(FLOWER), "a benchmark without a smoke test (or a stale one)"
