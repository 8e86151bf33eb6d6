"""Real Flower processes on loopback for the integration tests: `atoll coordinator` and
`atoll site` started exactly as a person would, killed and restarted as machines are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from atoll.app.metrics import read_metrics
from atoll.deploy.flower_cli import free_port

ATOLL = [sys.executable, "-m", "atoll"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["ATOLL_DEBUG"] = "1"
    return env


class Federation:
    """One coordinator and its sites, each its own process group."""

    def __init__(self, root: Path, config: Path, keys: Path | None) -> None:
        self.root = root
        self.config = config
        self.keys = keys
        self.port = free_port()
        self.out = root / "run"
        self.coordinator: subprocess.Popen | None = None
        self.sites: dict[str, subprocess.Popen] = {}

    def _security(self) -> list[str]:
        return ["--keys", str(self.keys)] if self.keys else ["--insecure"]

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:
            return subprocess.Popen([*ATOLL, *args], stdout=f, stderr=subprocess.STDOUT,
                                    env=_env(), start_new_session=True, cwd=self.root)

    def start_coordinator(self, resume: bool = False, *overrides: str) -> None:
        args = (["coordinator", "--resume", str(self.out)] if resume else
                ["coordinator", str(self.config), "--out", str(self.out)])
        args += ["--host", "127.0.0.1", "--port", str(self.port), *self._security(), *overrides]
        self.coordinator = self._spawn(args, self.root / "coordinator.log")

    def start_site(self, name: str, data: Path, *extra: str) -> None:
        args = ["site", "--coordinator", f"127.0.0.1:{self.port}", "--data", str(data),
                "--name", name, "--state", str(self.root / "state" / name), "--threads", "1",
                *self._security(), *extra]
        self.sites[name] = self._spawn(args, self.root / f"site-{name}.log")

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Kill a whole process group: the machine (or its power) is gone."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def rounds(self) -> list[dict]:
        return [r for r in read_metrics(self.out / "metrics.jsonl")
                if r["kind"] == "round" and r["run"] == "federation" and r["round"] > 0]

    def wait_for(self, what: str, predicate, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.coordinator is not None and self.coordinator.poll() not in (None, 0):
                raise AssertionError(f"coordinator exited early while waiting for {what}:\n"
                                     + self.log("coordinator"))
            time.sleep(1.0)
        raise AssertionError(f"timed out waiting for {what}:\n" + self.log("coordinator"))

    def wait_round(self, n: int, timeout_s: float = 240) -> None:
        self.wait_for(f"round {n}", lambda: len(self.rounds()) >= n, timeout_s)

    def wait_finished(self, timeout_s: float = 300) -> int:
        deadline = time.monotonic() + timeout_s
        while self.coordinator.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError("the run did not finish:\n" + self.log("coordinator"))
            time.sleep(1.0)
        return self.coordinator.returncode

    def log(self, name: str) -> str:
        path = self.root / ("coordinator.log" if name == "coordinator" else f"site-{name}.log")
        return path.read_text()[-4000:] if path.exists() else ""

    def close(self) -> None:
        """Ctrl-C everything, then make sure nothing is left to disturb the next test."""
        procs = [p for p in [*self.sites.values(), self.coordinator] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        # whatever outlives Ctrl-C by 5 s is killed: no test checks a graceful exit, and
        # each second here is paid by every Flower test
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def write_config(path: Path, data: dict[str, Path], **sections: dict) -> Path:
    """A small Flower run config naming ``data``'s sites (their data stays with them)."""
    tree = {"name": "flower-test", "seed": 0, "threads": 1, "data": {"seq_len": 64},
            "inner": {"batch_size": 4, "warmup_steps": 1},
            "federation": {"rounds": 3, "steps_per_round": 3, "min_sites": len(data)},
            "eval": {"max_batches": 1}, "baseline": {"kinds": []},
            "sites": [{"name": n, "data": str(d)} for n, d in data.items()]}
    for k, v in sections.items():
        tree.setdefault(k, {}).update(v)
    path.write_text(tomli_w.dumps(tree))
    return path


def assert_same_validation(a: Path, b: Path, domains: tuple[str, ...], rounds: int) -> None:
    """Runs ``a`` and ``b`` have the same validation loss per domain after each of rounds
    0..``rounds`` (to 1e-4: the two engines' float sums may differ in their last bits)."""
    import pytest

    val = [{r["round"]: r["val_loss"] for r in read_metrics(out / "metrics.jsonl")
            if r["kind"] == "round" and r["run"] == "federation"} for out in (a, b)]
    assert sorted(val[0]) == sorted(val[1]) == list(range(rounds + 1))
    for r, losses in val[0].items():
        assert sorted(losses) == sorted(domains)
        for domain, loss in losses.items():
            assert loss == pytest.approx(val[1][r][domain], abs=1e-4), (r, domain)
