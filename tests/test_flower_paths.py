"""A grid of paths on a real federation (issue 16): flower-superlink and three supernodes
with TLS and keys give the local engine's numbers for the same config and seed: the router,
every path's weights, and the sites' routed validation losses."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from atoll.app.metrics import read_metrics
from atoll.app.run_config import load_run_config
from atoll.app.simulate import simulate
from atoll.deploy.keys import make_keys
from tests.conftest import ONE_AT_A_TIME
from tests.flower_harness import assert_same_validation, write_config
from tests.test_flower import federation as federation  # noqa: F401 - a fixture

pytestmark = [pytest.mark.slow, ONE_AT_A_TIME]

SITES = ("code", "scripture", "speeches")


def test_flower_equals_local_engine_on_a_two_by_two_grid(demo_data, tmp_path,
                                                          federation):  # noqa: F811
    data = {s: demo_data[s] for s in SITES}
    config = write_config(tmp_path / "fed.toml", data,
                          model={"paths": {"levels": [[0, 2], [2, 4]],
                                           "modules_per_level": [2, 2]}})
    keys = tmp_path / "keys"
    make_keys(keys, list(SITES))
    fed = federation(config, keys)
    fed.start_coordinator()
    for s in SITES:
        fed.start_site(s, data[s])
    assert fed.wait_finished() == 0, fed.log("coordinator")

    local = simulate(load_run_config(config), tmp_path / "local", report=False)
    index = json.loads((fed.out / "model" / "paths.json").read_text())
    assert index["paths"] == ["p0-0", "p0-1", "p1-0", "p1-1"]
    # the same router from the same features, sent over the wire by each site
    assert (fed.out / "router" / "router.safetensors").read_bytes() == \
        (tmp_path / "local" / "router" / "router.safetensors").read_bytes()
    for name in index["paths"]:
        a = load_file(fed.out / "model" / name / "model.safetensors")
        b = load_file(tmp_path / "local" / "model" / name / "model.safetensors")
        for n, w in b.items():
            # Updates arrive in another order than locally, and a float32 sum of three is not
            # associative: a last-bit difference, which AdamW's next steps can grow to a few
            # 1e-5 where a gradient is near zero (a handful of entries). The rest is equal.
            diff = (a[n] - w).abs()
            assert diff.max() < 1e-3 and (diff > 1e-5).float().mean() < 1e-3, (name, n)
    # every site trained its own drawn path each round, as locally; bytes down per site
    # are one path's, not the grid's
    path_bytes = 4 * sum(t.numel() for t in local.model.parameters())
    rounds = [[r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "site"]
              for out in (fed.out, tmp_path / "local")]
    assert sorted((r["round"], r["site"], r["accepted"]) for r in rounds[0]) == \
        sorted((r["round"], r["site"], r["accepted"]) for r in rounds[1])
    assert all(path_bytes < r["bytes_down"] < path_bytes + 200_000 for r in rounds[0])
    # validated by the sites, each path on the held-out rows routed to it, as locally
    assert_same_validation(fed.out, tmp_path / "local", SITES, rounds=3)
