"""Membership on a real federation: the config's [[sites]] decide whose keys are
registered, and a site dropped from it is unregistered when the coordinator restarts."""

from __future__ import annotations

import tomllib

import pytest
import tomli_w

from atoll.deploy.keys import make_keys
from tests.conftest import ONE_AT_A_TIME
from tests.flower_harness import write_config
from tests.test_flower import federation as federation  # noqa: F401 - a fixture
from tests.test_flower import port_closed

pytestmark = [pytest.mark.slow, ONE_AT_A_TIME]


def test_a_site_dropped_from_the_config_is_unregistered_on_restart(demo_data, tmp_path,
                                                                    federation):  # noqa: F811
    data = {"code": demo_data["code"], "speeches": demo_data["speeches"]}
    config = write_config(tmp_path / "fed.toml", data,
                          federation={"rounds": 2, "steps_per_round": 1, "min_sites": 1})
    keys = tmp_path / "keys"
    make_keys(keys, [*data, "stranger"])  # a key the config never names
    fed = federation(config, keys)
    fed.start_coordinator()
    fed.wait_for("the run folder", lambda: (fed.out / "run.json").exists())
    first = fed.log("coordinator")
    assert "registered site keys: code, speeches" in first, first  # not the stranger
    fed.kill(fed.coordinator)
    port_closed(fed.port)
    # the operator drops speeches from the run's config and starts the coordinator again
    path = fed.out / "config.toml"
    tree = tomllib.loads(path.read_text())
    tree["sites"] = [s for s in tree["sites"] if s["name"] == "code"]
    path.write_text(tomli_w.dumps(tree))
    fed.start_coordinator(resume=True)
    fed.wait_for("unregistering", lambda: "unregistered site speeches" in
                 fed.log("coordinator"))
    fed.start_site("speeches", data["speeches"], "--max-wait", "20")
    fed.wait_for("the SuperLink to refuse speeches",  # its key no longer gets in
                 lambda: "refused this site's key" in fed.log("speeches"))
    fed.start_site("code", data["code"])
    assert fed.wait_finished() == 0, fed.log("coordinator")
    assert [r["sites"] for r in fed.rounds()] == [["code"], ["code"]]
