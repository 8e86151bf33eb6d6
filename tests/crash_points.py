"""Crash-point injection over a round's writes: every rename atoll makes (each checkpoint,
site state, ledger head, status and metrics file goes into place by one) is a point where a
killed process stops. Crashing at each in turn and resuming must give the run that never
crashed: the same weights, a ledger that verifies, one record per round.

Used by tests/test_crashes.py and by ``python -m tests.crash_points`` (the figures in
BENCHMARKS.md, "Reliability").
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atoll.app.metrics import FEDERATION, read_metrics
from atoll.app.run import Run
from atoll.app.run_config import RunConfig
from atoll.engines.local import LocalEngine
from atoll.federation.faults import make_site
from atoll.ledger.chain import verify_ledger

CRASHED = 77
"""Exit status of a process killed at its crash point."""


class CrashAt:
    """``os.replace`` that counts its calls and ends the process on the spot at call ``at``
    (``os._exit``: no cleanup, no flush, no ``finally``, as a kill) before renaming; 0 =
    never."""

    def __init__(self, at: int = 0) -> None:
        self.at, self.calls, self._real = at, 0, os.replace
        self.targets: list[str] = []

    def __call__(self, src: str | os.PathLike, dst: str | os.PathLike) -> None:
        self.calls += 1
        self.targets.append(str(dst))
        if self.calls == self.at:
            os._exit(CRASHED)
        self._real(src, dst)

    def __enter__(self) -> CrashAt:
        os.replace = self
        return self

    def __exit__(self, *exc: object) -> None:
        os.replace = self._real


def crash_in_child(cfg: RunConfig, out: Path, at: int) -> int:
    """Resume ``out`` in a forked process that dies at write ``at``; its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            with CrashAt(at):
                run_rounds(cfg, out, resume=True)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_rounds(cfg: RunConfig, out: Path, resume: bool) -> dict[str, torch.Tensor]:
    """Run (or resume) ``cfg`` in ``out`` with the local engine; the final global weights."""
    run = Run(cfg, out, resume=resume)
    engine = None
    try:
        sites = [make_site(s.name, s.data, out / "sites" / s.name) for s in cfg.sites]
        engine = LocalEngine(sites)
        run.execute(engine)
        return {k: v.clone() for k, v in run.coordinator.weights.items()}
    finally:
        if engine is not None:
            engine.close()
        run.close()


@dataclass
class Tally:
    """Crash points tried, and those after which the resumed run equals the clean one."""

    tried: int = 0
    intact: int = 0
    failures: list[str] = field(default_factory=list)


def check_intact(out: Path, weights: dict[str, torch.Tensor],
                 reference: dict[str, torch.Tensor], rounds: int) -> str | None:
    """What the resumed run lost or changed; None when nothing."""
    for name, tensor in reference.items():
        if not torch.equal(weights[name], tensor):
            return f"weights differ ({name})"
    verdict = verify_ledger(out / "ledger.sqlite")
    if not verdict.ok:
        return str(verdict)
    seen = [r["round"] for r in read_metrics(out / "metrics.jsonl")
            if r["kind"] == "round" and r["run"] == FEDERATION]
    if seen != list(range(rounds + 1)):
        return f"metrics hold rounds {seen}"
    return None


def inject(cfg: RunConfig, root: Path, only: tuple[str, ...] = ("",)
           ) -> tuple[Tally, dict[str, torch.Tensor]]:
    """Run all but ``cfg``'s last round once; then for each write of the last round (from
    the resume that opens it to its checkpoint) kill a process there, resume, and compare
    with the run that was not killed (``only``: just the writes whose target contains one of these).
    The tally, and that run's final weights."""
    rounds = cfg.federation.rounds
    first = root / "before-last-round"
    cfg.federation.rounds = rounds - 1
    run_rounds(cfg, first, resume=False)
    cfg.federation.rounds = rounds
    clean = root / "clean"
    shutil.copytree(first, clean)
    with CrashAt() as counter:
        reference = run_rounds(cfg, clean, resume=True)
    tally = Tally()
    for at in range(1, counter.calls + 1):
        if not any(part in counter.targets[at - 1] for part in only):
            continue
        out = root / f"crash-{at}"
        shutil.copytree(first, out)
        tally.tried += 1
        if crash_in_child(cfg, out, at) != CRASHED:
            tally.failures.append(f"write {at}: the process did not stop there")
            continue
        problem = check_intact(out, run_rounds(cfg, out, resume=True), reference, rounds)
        if problem is None:
            tally.intact += 1
        else:
            tally.failures.append(f"write {at}: {problem}")
        shutil.rmtree(out)
    return tally, reference


def main() -> int:
    """Print the crash-point figures for a 2-site, 2-round tiny-model run."""
    import tempfile

    from atoll.data.demo import build_demo_data
    from tests.conftest import small_config

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = build_demo_data(Path(tmp) / "data", tokens_per_domain=40_000, seq_len=64,
                               log=lambda s: None)
        tally, _ = inject(crash_config(data, small_config), Path(tmp))
    print(f"crash points tried: {tally.tried}; resumed with nothing lost: {tally.intact}")
    for f in tally.failures:
        print(f"  {f}")
    return 0 if tally.intact == tally.tried else 1


def crash_config(data: dict[str, Path], small_config: object) -> RunConfig:
    """Two sites, two rounds of one step, evaluation only at the start and the end."""
    return small_config(data, ["code", "scripture"],  # type: ignore[operator]
                        federation={"rounds": 2, "steps_per_round": 1},
                        inner={"batch_size": 2}, credit={"batches": 0},
                        eval={"batch_size": 4, "max_batches": 1, "every": 100})


if __name__ == "__main__":
    sys.exit(main())
