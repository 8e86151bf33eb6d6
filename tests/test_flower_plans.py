"""Every site gets its own plan on Flower: with changes of the weights sent down and sites
that sit rounds out, sites of one round receive different payloads, and the run still
equals the local engine's bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from atoll.app.metrics import read_metrics
from atoll.app.run_config import load_run_config
from atoll.app.simulate import simulate
from atoll.deploy.keys import make_keys
from tests.conftest import ONE_AT_A_TIME
from tests.flower_harness import Federation, write_config

pytestmark = [pytest.mark.slow, ONE_AT_A_TIME]

SITES = ("code", "scripture", "speeches")


def test_flower_sends_each_site_its_own_payload(demo_data, tmp_path):
    """Two of three sites a round, int8 changes down: a site that sat the last round out
    gets the weights whole while the other gets only the change. Two updates a round are
    summed the same in either arrival order, so the engines must agree exactly."""
    data = {s: demo_data[s] for s in SITES}
    config = write_config(tmp_path / "fed.toml", data,
                          federation={"rounds": 4, "sites_per_round": 2},
                          comm={"up": {"kind": "int8"}, "down": {"kind": "int8", "delta": True}})
    keys = tmp_path / "keys"
    make_keys(keys, list(SITES))
    fed = Federation(tmp_path, config, keys)
    try:
        fed.start_coordinator()
        for s in SITES:
            fed.start_site(s, data[s])
        assert fed.wait_finished() == 0, fed.log("coordinator")
    finally:
        fed.close()

    local = simulate(load_run_config(config), tmp_path / "local", report=False)
    flower = load_file(fed.out / "model" / "model.safetensors")
    for name, w in local.coordinator.weights.items():
        assert torch.equal(flower[name], w), name

    def sites_by_round(out):
        recs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "site"]
        return [(r["round"], r["site"], r["accepted"]) for r in recs]

    assert sorted(sites_by_round(fed.out)) == sorted(sites_by_round(tmp_path / "local"))
    # some round had one site on changes and one on the whole copy (the case a shared
    # payload would get wrong): their downlink bytes differ several-fold
    down: dict[int, list[int]] = {}
    for r in read_metrics(fed.out / "metrics.jsonl"):
        if r["kind"] == "site" and r.get("bytes_down"):
            down.setdefault(r["round"], []).append(r["bytes_down"])
    assert any(max(b) > 3 * min(b) for b in down.values() if len(b) == 2), down
