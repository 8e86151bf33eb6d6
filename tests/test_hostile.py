"""Hostile sites against a real coordinator: `atoll coordinator` and `atoll site` processes on
loopback, TLS and site authentication on. Two sites mount one attack a round each
(``--fault a,b,c,d``) beside one honest site; every attack is refused with its reason, the
run completes, and the global weights are those of the same run without them (run on the
local engine, which gives a Flower run's weights: tests/test_flower.py)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from atoll.app.books import LEDGER
from atoll.app.run_config import load_run_config
from atoll.app.simulate import simulate
from atoll.deploy import flower_cli as fc
from atoll.deploy.keys import make_keys
from tests.conftest import ONE_AT_A_TIME
from tests.flower_harness import Federation, write_config
from tests.outsiders import control_attempts, flwr_as, outsider, wait_for_json, write_evil_app

pytestmark = [pytest.mark.slow, ONE_AT_A_TIME]

HONEST = "code"
# round r: each hostile site mounts the r-th attack of its list
ATTACKS = {
    "mallory": ["update_poison", "header_nan", "header_bad_type", "header_huge_tokens",
                "header_node_key"],
    "trudy": ["header_huge_steps", "header_wrong_round", f"header_wrong_site={HONEST}",
              "header_deep_json", "header_unbound_signer"],
}
ROUNDS = 5


def config(root, members: dict):
    return write_config(root / "fed.toml", members,
                        federation={"rounds": ROUNDS, "steps_per_round": 2,
                                    "min_sites": len(members), "deadline_s": 60.0})


# session scope: under pytest-xdist a module-scoped fixture can be torn down and built again
# between two of the module's tests (the federation cost two minutes each time); these hold
# no open resources, only results
@pytest.fixture(scope="session")
def attacked(demo_data, tmp_path_factory) -> Federation:
    """A finished federation of the honest site and the two attackers."""
    root = tmp_path_factory.mktemp("attacked")
    members = {HONEST: demo_data[HONEST], "mallory": demo_data["speeches"],
               "trudy": demo_data["scripture"]}
    make_keys(root / "keys", list(members))
    fed = Federation(root, config(root, members), root / "keys")
    try:
        fed.start_coordinator()
        fed.start_site(HONEST, members[HONEST])
        for name, attacks in ATTACKS.items():
            fed.start_site(name, members[name], "--fault", ",".join(attacks))
        fed.wait_round(1)
        _mount_control_attacks(fed, root)
        assert fed.wait_finished(timeout_s=400) == 0, fed.log("coordinator")
        fed.evil_replies = wait_for_json(root / "evil-replies.json", 120)
    finally:
        fed.close()
    return fed


def _mount_control_attacks(fed: Federation, root) -> None:
    """An outsider holding only ca.crt tries Flower's control API on the coordinator's
    port (knowing the run id from its banner); then an app that is not atoll's is
    started from the coordinator's own host, as if that host had been taken over."""
    run_id = re.search(r"run (\d+) started", fed.log("coordinator")).group(1)
    evil = write_evil_app(root / "evil", len(ATTACKS) + 1, root / "evil-ran",
                          root / "evil-replies.json")
    home = outsider(root / "outsider", fed.port, fed.keys / "ca.crt")
    fed.attempts = control_attempts(home, evil, run_id)
    fed.evil_run = flwr_as(fed.out / "flower" / "home", "run", str(evil), fc.CONNECTION)


@pytest.fixture(scope="session")
def clean(demo_data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The global weights of the same run with the honest site alone."""
    root = tmp_path_factory.mktemp("clean")
    cfg = load_run_config(config(root, {HONEST: demo_data[HONEST]}))
    return simulate(cfg, root / "run", report=False).coordinator.weights


def refused(attacked: Federation, clean: dict[str, torch.Tensor], attack: str, words: str
            ) -> None:
    """``attack`` was refused in its round with ``words`` in the reason (the coordinator's
    metrics); only the honest site counted, every round; the run completed with the clean
    run's weights."""
    site, = (s for s, a in ATTACKS.items() if attack in a)
    r = ATTACKS[site].index(attack) + 1
    rounds = attacked.rounds()
    assert [x["round"] for x in rounds] == list(range(1, ROUNDS + 1))
    assert all(x["sites"] == [HONEST] for x in rounds)
    reason = rounds[r - 1]["rejected"][site]
    assert words in reason, reason
    ours = load_file(attacked.out / "model" / "model.safetensors")
    assert ours.keys() == clean.keys()
    for k, w in clean.items():  # as close as Flower and the local engine always are
        torch.testing.assert_close(ours[k], w, rtol=0, atol=1e-5)


def test_poisoned_update_of_huge_finite_values(attacked, clean):
    """1e37 everywhere: finite, so every per-value check passes, but a sum overflows."""
    refused(attacked, clean, "update_poison", "exceeds the bound")


def test_nan_in_header_json(attacked, clean):
    refused(attacked, clean, "header_nan", "NaN")


def test_token_count_of_the_wrong_type(attacked, clean):
    refused(attacked, clean, "header_bad_type", "'tokens' must be an integer")


def test_token_count_beyond_the_plan(attacked, clean):
    """A million times the tokens read: the site's weight in the mean."""
    refused(attacked, clean, "header_huge_tokens", "can be read")


def test_step_count_beyond_the_plan(attacked, clean):
    refused(attacked, clean, "header_huge_steps", "its plan allowed 1..2")


def test_wrong_round_number(attacked, clean):
    refused(attacked, clean, "header_wrong_round", "the open round is 2")


def test_another_sites_name_in_the_header(attacked, clean):
    refused(attacked, clean, f"header_wrong_site={HONEST}",
            f"claims to be site '{HONEST}', but was sent by the node of site 'trudy'")


def test_deeply_nested_header_json(attacked, clean):
    refused(attacked, clean, "header_deep_json", "deep, the limit is 32")


@pytest.mark.parametrize("command", ["ls", "supernode list", "stop", "run"])
def test_an_outsider_cannot_use_the_control_api(attacked, clean, command):
    """With the CA certificate and the run id, `flwr ls`, `flwr supernode list`, `flwr stop`
    and `flwr run` against the coordinator's port all fail: the gate passes only the Fleet
    API, and says so in its log with the caller's address. The run completes untouched."""
    res = attacked.attempts[command]
    assert res.returncode != 0, res.stdout + res.stderr
    gate = (attacked.out / "flower" / "gate.log").read_text()
    assert "refused POST '/v1/control/" in gate and "from 127.0.0.1" in gate, gate
    refused(attacked, clean, "update_poison", "exceeds the bound")  # the run went on


def test_a_site_runs_no_app_but_atolls(attacked, clean):
    """An app that calls itself atoll but brings its own ClientApp, started on the
    SuperLink (as from a compromised coordinator host): every site refuses it before its
    code is unpacked, each answer is an error, and its code never ran anywhere."""
    assert attacked.evil_run.returncode == 0, attacked.evil_run.stdout + attacked.evil_run.stderr
    replies = attacked.evil_replies
    assert replies is not None and len(replies) == len(ATTACKS) + 1, replies
    assert all(r != "ran" for r in replies), replies
    assert not (attacked.root / "evil-ran").exists()
    for name in [HONEST, *ATTACKS]:
        log = (attacked.root / "state" / name / "supernode.log").read_text()
        assert "refused to run an app: app bundle holds ['evil_app/__init__.py'" in log, log[-3000:]
    refused(attacked, clean, "header_nan", "NaN")  # the federation's own run went on


def test_a_reply_naming_its_own_node_key(attacked, clean):
    refused(attacked, clean, "header_node_key", "'node_key' is the coordinator's to fill in")


def test_a_receipt_key_that_no_registered_node_key_vouches_for(attacked, clean):
    """A receipt validly signed by a fresh key: trusted on first use it would count."""
    refused(attacked, clean, "header_unbound_signer",
            "receipt key is not the one the site's registered node key vouches for")


def test_every_counted_receipt_is_vouched_for_by_the_registered_node_key(attacked, clean):
    """Each update in the ledger names the node key that authenticated it, the key the
    operator registered for that site, and its binding of the receipt key checks out."""
    from cryptography.hazmat.primitives import serialization

    from atoll.ledger.chain import read_entries
    from atoll.ledger.receipts import check_binding

    updates = [e.body for e in read_entries(attacked.out / LEDGER) if e.kind == "update"]
    assert len(updates) == ROUNDS and {b["site"] for b in updates} == {HONEST}
    registered = serialization.load_ssh_public_key(
        (attacked.keys / "sites" / f"{HONEST}.pub").read_bytes())
    for b in updates:
        assert serialization.load_pem_public_key(b["node_key"].encode()) == registered
        assert check_binding(b["node_key"], b["signer"], b["signer_binding"]) is None
