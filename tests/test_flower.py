"""A real federation on loopback: flower-superlink + flower-supernodes started by `atoll
coordinator` and `atoll site`, with TLS and site authentication, killed and restarted."""

from __future__ import annotations

import math
import socket
import time

import pytest
import torch
from safetensors.torch import load_file

from atoll.app.metrics import read_metrics
from atoll.app.run_config import load_run_config
from atoll.app.simulate import simulate
from atoll.app.status import read_status
from atoll.deploy.keys import make_keys
from atoll.ledger.chain import read_entries, verify_ledger
from atoll.ledger.credit import shares
from atoll.util.storage import load_state
from tests.conftest import ONE_AT_A_TIME
from tests.flower_harness import Federation, assert_same_validation, write_config

pytestmark = [pytest.mark.slow, ONE_AT_A_TIME]

SITES = ("code", "scripture", "speeches")


@pytest.fixture
def federation(tmp_path):
    feds = []

    def make(config, keys=None):
        fed = Federation(tmp_path, config, keys)
        feds.append(fed)
        return fed

    yield make
    for fed in feds:
        fed.close()


def test_flower_equals_local_engine_and_refuses_strangers(demo_data, tmp_path, federation):
    """Same config and seed: 1 SuperLink + 3 SuperNodes give the local engine's weights.
    Weights travel through a file:// object store; a site whose key was never registered
    is refused."""
    data = {s: demo_data[s] for s in SITES}
    store = f"file://{tmp_path / 'store'}"
    config = write_config(tmp_path / "fed.toml", data, comm={"store": store})
    keys = tmp_path / "keys"
    make_keys(keys, list(SITES))
    stranger_keys = tmp_path / "stranger"  # its own CA-less key: never registered
    make_keys(stranger_keys, ["code"])

    fed = federation(config, keys)
    fed.start_coordinator()
    for s in SITES:
        fed.start_site(s, data[s])
    fed.start_site("intruder", demo_data["shakespeare"], "--key",
                   str(stranger_keys / "sites" / "code"), "--ca", str(keys / "ca.crt"),
                   "--max-wait", "20")
    assert fed.wait_finished() == 0, fed.log("coordinator")

    local = simulate(load_run_config(config), tmp_path / "local", report=False)
    flower = load_file(fed.out / "model" / "model.safetensors")
    for name, w in local.coordinator.weights.items():
        torch.testing.assert_close(flower[name], w, rtol=0, atol=1e-5)
    rounds = fed.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(sorted(r["sites"]) == list(SITES) for r in rounds)
    # weights went by the store, each writer under its own prefix; the objects of rounds
    # already checkpointed (two kept: 2 and 3) were deleted, the last round's are left
    left = {p.relative_to(tmp_path / "store").parts[1:] for p in
            (tmp_path / "store").rglob("*") if p.is_file()}
    run_folders = {p[:-1] for p in left}
    assert ("coordinator", "round-00003") in run_folders
    assert {("sites", s, "round-00003") for s in SITES} <= run_folders
    assert all(f[-1].endswith("00003") for f in run_folders), sorted(run_folders)
    # the sites evaluated the global weights on their held-out rows, as they do locally
    assert_same_validation(fed.out, tmp_path / "local", SITES, rounds=3)
    assert fed.sites["intruder"].wait(timeout=120) != 0  # refused by the SuperLink
    assert "refused this site's key" in fed.log("intruder")
    assert "intruder" not in str(read_metrics(fed.out / "metrics.jsonl"))
    # the same books: every site's signed report checked, the same credit as locally
    assert verify_ledger(fed.out / "ledger.sqlite").ok
    a = shares(read_entries(fed.out / "ledger.sqlite"))
    b = shares(read_entries(tmp_path / "local" / "ledger.sqlite"))
    assert [(s.contributor, s.tokens) for s in a] == [(s.contributor, s.tokens) for s in b]
    for x, y in zip(a, b, strict=True):
        assert x.share == pytest.approx(y.share, rel=1e-3)


def test_site_killed_late_joiner_and_restart(demo_data, tmp_path, federation):
    """A site killed mid-round: the round closes at its deadline without it and the run goes
    on; restarted, it rejoins from the current weights. A late site joins the next round."""
    data = {s: demo_data[s] for s in SITES}
    config = write_config(tmp_path / "fed.toml", data,
                          federation={"rounds": 12, "steps_per_round": 40, "min_sites": 2,
                                      "deadline_s": 30.0})
    keys = tmp_path / "keys"
    make_keys(keys, list(SITES))
    fed = federation(config, keys)
    fed.start_coordinator()
    fed.start_site("code", data["code"])
    fed.start_site("scripture", data["scripture"])
    fed.wait_round(1)
    fed.start_site("speeches", data["speeches"])  # joins after the run started
    fed.wait_for("speeches to take part", lambda: any(
        "speeches" in r["sites"] for r in fed.rounds()))
    joined = next(r["round"] for r in fed.rounds() if "speeches" in r["sites"])

    # kill scripture's machine while it trains (its part of a round takes seconds)
    def scripture_training() -> bool:
        state = read_status(fed.out)
        return state["phase"] == "training" and "scripture" in state["waiting_for"]

    fed.wait_for("scripture training", scripture_training)
    fed.kill(fed.sites["scripture"])
    killed_round = read_status(fed.out)["round"]
    fed.wait_round(killed_round)
    closed = fed.rounds()[killed_round - 1]
    assert "scripture" not in closed["sites"] and closed["sites"]  # the others went on
    assert "scripture" in closed["rejected"]

    # Same key, same state directory. Flower counts the vanished node online until its
    # heartbeat lapses (up to 60s), so the restarted site is refused a few times first.
    fed.start_site("scripture", data["scripture"])

    def back() -> list[int]:
        return [r["round"] for r in fed.rounds()
                if r["round"] > killed_round and "scripture" in r["sites"]]

    fed.wait_for("scripture to take part again", back)
    assert fed.wait_finished(timeout_s=400) == 0, fed.log("coordinator")
    rounds = fed.rounds()
    assert [r["round"] for r in rounds] == list(range(1, 13))
    assert "speeches" not in rounds[0]["sites"] and joined >= 2
    assert back()[-1] == 12  # and it stayed
    # It trained from the schedule position the plans gave it, not from its own count: it
    # missed rounds, yet the state it saved after round 12 is at step 12 x 40, with the
    # learning rate of step 479 (warm-up 1, cosine from 3e-3 to 3e-4 over 480 steps).
    state = load_state(tmp_path / "state" / "scripture" / "round-00012")
    assert state["trainer"]["step"] == 12 * 40
    lr = 3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + math.cos(math.pi * 478 / 479))
    lrs = [g["lr"] for g in state["trainer"]["optimizer"]["param_groups"]]
    assert lrs == pytest.approx([lr] * len(lrs), rel=1e-12)


def port_closed(port: int, timeout_s: float = 30) -> None:
    """Wait until nothing accepts TCP connections on ``127.0.0.1:port`` any more."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"something still listens on port {port}")
        time.sleep(0.1)


def test_coordinator_crash_resume_and_bad_sites(demo_data, tmp_path, federation):
    """The coordinator machine dies mid-run and comes back with --resume: it continues from
    its checkpoint while the sites keep running. A site that sends garbage and one that
    sends stale-round updates are rejected with reasons; the others are unaffected."""
    data = {s: demo_data[s] for s in SITES}
    members = {**data, "garbler": demo_data["speeches"], "laggard": demo_data["speeches"]}
    config = write_config(tmp_path / "fed.toml", members,
                          federation={"rounds": 4, "steps_per_round": 3, "min_sites": 4,
                                      # every round closes when all four reply; the long
                                      # deadline only covers sites reconnecting after the
                                      # restart on a loaded machine
                                      "deadline_s": 180.0})
    keys = tmp_path / "keys"
    make_keys(keys, [*SITES, "garbler", "laggard"])
    fed = federation(config, keys)
    fed.start_coordinator()
    for s in SITES[:2]:
        fed.start_site(s, data[s])
    fed.start_site("garbler", data["speeches"], "--fault", "garbage")
    fed.start_site("laggard", data["speeches"], "--fault", "stale")
    fed.wait_round(1)
    fed.kill(fed.coordinator)  # SuperLink and ServerApp die with it
    done_before = len(fed.rounds())
    port_closed(fed.port)  # the machine is down: its SuperLink no longer answers
    fed.start_coordinator(resume=True)
    assert fed.wait_finished(timeout_s=400) == 0, fed.log("coordinator")

    rounds = fed.rounds()
    assert [r["round"] for r in rounds] == list(range(1, 5))  # nothing lost, nothing twice
    assert done_before >= 1
    for r in rounds:
        assert sorted(r["sites"]) == ["code", "scripture"]
        assert "undecodable" in r["rejected"]["garbler"]
        assert "stale" in r["rejected"]["laggard"]
    sites = [r for r in read_metrics(fed.out / "metrics.jsonl") if r["kind"] == "site"]
    assert {r["site"] for r in sites if r["accepted"]} == {"code", "scripture"}
    assert (fed.out / "model" / "model.safetensors").exists()

