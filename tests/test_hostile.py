"""Hostile sites against a real coordinator: `atoll coordinator` and `atoll site` processes on
loopback, TLS and site authentication on. Two sites mount one attack a round each
(``--fault a,b,c,d``) beside one honest site; every attack is refused with its reason, the
run completes, and the global weights are those of the same run without them (run on the
local engine, which gives a Flower run's weights: tests/test_flower.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from atoll.app.run_config import load_run_config
from atoll.app.simulate import simulate
from atoll.deploy.keys import make_keys
from tests.flower_harness import Federation, write_config

pytestmark = pytest.mark.slow

HONEST = "code"
# round r: each hostile site mounts the r-th attack of its list
ATTACKS = {
    "mallory": ["update_poison", "header_nan", "header_bad_type", "header_huge_tokens"],
    "trudy": ["header_huge_steps", "header_wrong_round", f"header_wrong_site={HONEST}",
              "header_deep_json"],
}
ROUNDS = 4


def config(root, members: dict):
    return write_config(root / "fed.toml", members,
                        federation={"rounds": ROUNDS, "steps_per_round": 2,
                                    "min_sites": len(members), "deadline_s": 60.0})


@pytest.fixture(scope="module")
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
        assert fed.wait_finished(timeout_s=400) == 0, fed.log("coordinator")
    finally:
        fed.close()
    return fed


@pytest.fixture(scope="module")
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
