"""Crashes lose nothing (issue 14, item 9): each test names the crash or the bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from flwr.common.config import parse_config_args

from atoll.app.run_config import load_run_config
from atoll.config import ConfigError, load
from atoll.deploy import flower_cli as fc
from atoll.deploy.site_host import SiteOptions, supernode_command
from atoll.engines.site_worker import SOCKET, call_worker
from atoll.ledger.chain import Ledger, verify_ledger
from atoll.ledger.signing import Signer
from atoll.util.atomic import write_atomic
from atoll.util.deadlines import FLOWER_MESSAGE_TTL_S
from atoll.util.storage import StateError
from tests.conftest import small_config
from tests.crash_points import check_intact, crash_config, inject, run_rounds


@pytest.mark.slow
def test_kill_at_every_write_of_a_rounds_commit_then_resume_loses_nothing(demo_data, tmp_path):
    """Killed at each ledger-head and checkpoint rename of the last round: the
    resumed run has the clean run's weights, a ledger that verifies and every round once."""
    tally, reference = inject(crash_config(demo_data, small_config), tmp_path,
                              only=("ledger.sqlite.head", "checkpoints"))
    assert tally.tried >= 5 and tally.intact == tally.tried, tally.failures
    # the clean resumed run equals a run never stopped at all
    whole = run_rounds(crash_config(demo_data, small_config), tmp_path / "whole", False)
    assert all(torch.equal(whole[k], v) for k, v in reference.items())
    # the newest checkpoint damaged: resume from the one before, same weights again
    clean = tmp_path / "clean"
    tensors = clean / "checkpoints" / "round-00002" / "coordinator" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    cfg = crash_config(demo_data, small_config)
    assert check_intact(clean, run_rounds(cfg, clean, True), reference, 2) is None
    for r in (1, 2):  # none loads: one clear line
        (clean / "checkpoints" / f"round-0000{r}" / "coordinator" / "state.json").write_text("{")
    with pytest.raises(StateError, match="no checkpoint loads"):
        run_rounds(cfg, clean, True)


def test_crash_between_ledger_commit_and_head_is_repaired_on_open(tmp_path):
    signer = Signer.generate()
    ledger = Ledger(tmp_path / "l.sqlite", signer)
    ledger.append("genesis", 0, {"coordinator_key": signer.public})
    ledger.append("round", 1, {"n": 1})
    real = os.replace
    os.replace = _raise_at_first  # the head's rename: the entry committed, the head behind
    try:
        with pytest.raises(KeyboardInterrupt):
            ledger.append("round", 2, {"n": 2})
    finally:
        os.replace = real
    ledger.close()
    assert "does not match the signed head" in str(verify_ledger(tmp_path / "l.sqlite"))
    Ledger(tmp_path / "l.sqlite", signer).close()
    assert verify_ledger(tmp_path / "l.sqlite").ok
    # a head ahead of the chain (entries cut off) is not papered over
    head = tmp_path / "l.sqlite.head"
    h = json.loads(head.read_text())
    head.write_text(json.dumps({**h, "seq": 9}))
    Ledger(tmp_path / "l.sqlite", signer).close()
    assert not verify_ledger(tmp_path / "l.sqlite").ok


def _raise_at_first(src, dst):
    raise KeyboardInterrupt  # the process interrupted at the rename


def test_atomic_write_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_atomic(tmp_path / "a.json", b"{}")
    assert any(p.endswith(".tmp") for p in synced) and str(tmp_path) in synced


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_config_values_are_refused_naming_the_key(tmp_path, value):
    path = tmp_path / "c.toml"
    path.write_text(f"[outer]\nlr = {value}\n[checks]\n")
    with pytest.raises(ConfigError, match=r"'outer\.lr' must be a finite number"):
        load(type(small_config({}, [])), path)


def test_quotes_and_spaces_in_flower_config_strings_stay_one_value(tmp_path):
    odd = tmp_path / "it's a \"site\" dir"
    o = SiteOptions(coordinator="127.0.0.1:1", data=odd, name="x' worker=false y='",
                    state=odd / "state", insecure=True)
    o.data.mkdir(parents=True)
    cmd = supernode_command(o, 1234)
    node = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert node == {"name": o.name, "data": str(odd.resolve()),
                    "state": str((odd / "state").resolve()), "worker": True}
    run = fc.write_toml(tmp_path / "rc.toml", {"config": str(odd), "resume": False})
    assert parse_config_args([str(run)]) == {"config": str(odd), "resume": False}


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from atoll.engines.site_worker import SiteWorker

    class Echo:
        overlap_steps = 0
        def answer(self, head, blob):
            time.sleep(head.get("sleep", 0))
            return {"round": head["round"]}, blob[::-1]

    SiteWorker(Echo(), Path(sys.argv[1])).start()
    print("ready", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def worker(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield tmp_path
    proc.kill()
    proc.wait()


def test_site_worker_keeps_accepting_after_failed_and_stalled_handshakes(worker):
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    with pytest.raises((AuthenticationError, EOFError, OSError)):
        Client(str(worker / SOCKET), family="AF_UNIX", authkey=b"wrong" * 8)
    garbage = socket.socket(socket.AF_UNIX)
    garbage.connect(str(worker / SOCKET))
    garbage.sendall(b"\x00\x00\x00\x05hello")
    garbage.close()
    stalled = socket.socket(socket.AF_UNIX)  # connects and says nothing, kept open
    stalled.connect(str(worker / SOCKET))
    reply, out = call_worker(worker, {"round": 3}, b"abc")
    assert reply == {"round": 3} and out == b"cba"
    stalled.close()


def test_call_to_a_site_worker_that_never_answers_times_out(worker):
    with pytest.raises(TimeoutError, match="did not answer"):
        call_worker(worker, {"round": 1, "sleep": 2}, b"x", timeout_s=0.3)
    assert call_worker(worker, {"round": 2}, b"ab")[1] == b"ba"


def test_flower_round_deadline_has_a_finite_default(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nrounds = 1\n")
    assert load_run_config(path, simulation=False).federation.deadline_s == FLOWER_MESSAGE_TTL_S
    budget = load_run_config(path, ["federation.time_budget_s=300"], simulation=False)
    assert budget.federation.deadline_s == 2 * 300 + 600
    mine = load_run_config(path, ["federation.deadline_s=90"], simulation=False)
    assert mine.federation.deadline_s == 90


def test_second_process_on_a_held_run_folder_writes_nothing(tmp_path):
    from atoll.app.run_folder import RunFolder

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from atoll.app.run_folder import "
        "lock_run_folder; h = lock_run_folder(Path(sys.argv[1])); print('held', flush=True);"
        " time.sleep(60)"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="in use by another atoll process"):
            RunFolder(tmp_path, wait_s=0.2)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_restarted_coordinator_ends_the_orphaned_serverapp_and_takes_the_lock(tmp_path):
    """A coordinator killed outright can leave its ServerApp alive, holding the run folder:
    the next start ends it (by the pid it wrote) instead of waiting on its lock, and leaves
    alone a process that merely reuses the pid."""
    from atoll.app.run_folder import RunFolder
    from atoll.deploy.coordinator_host import SERVERAPP_PID, end_orphaned_serverapp

    hold = ("import sys, time; from pathlib import Path; from atoll.app.run_folder import "
            "lock_run_folder; h = lock_run_folder(Path(sys.argv[1])); print('held', flush=True);"
            " time.sleep(120)")
    pid_file = tmp_path / "flower" / SERVERAPP_PID
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    orphan = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path), "flwr-serverapp"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline().strip() == "held"
        write_atomic(pid_file, str(stranger.pid).encode())
        assert not end_orphaned_serverapp(pid_file, print)
        assert stranger.poll() is None  # not Flower's ServerApp: left alone
        write_atomic(pid_file, str(orphan.pid).encode())
        lines: list[str] = []
        assert end_orphaned_serverapp(pid_file, lines.append)
        assert orphan.wait(timeout=10) != 0 and f"pid {orphan.pid}" in lines[0]
        RunFolder(tmp_path, wait_s=0.2).release()  # the lock is free at once
        write_atomic(pid_file, b"not a pid")
        assert not end_orphaned_serverapp(pid_file, print)
    finally:
        for p in (stranger, orphan):
            p.kill()
            p.wait()
