"""A grid of paths on a real federation (issue 16): flower-superlink and three supernodes
with TLS and keys give the local engine's numbers for the same config and seed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from atoll.app.metrics import read_metrics
from atoll.app.run_config import load_run_config
from atoll.app.simulate import simulate
from atoll.deploy.keys import make_keys
from tests.flower_harness import write_config
from tests.test_flower import federation as federation  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

SITES = ("code", "scripture", "speeches")


def test_flower_equals_local_engine_on_a_two_by_two_grid(demo_data, tmp_path,
                                                          federation):  # noqa: F811
    data = {s: demo_data[s] for s in SITES}
    config = write_config(tmp_path / "fed.toml", data,
                          model={"paths": {"levels": [[0, 2], [2, 4]],
                                           "modules_per_level": [2, 2]}},
                          eval={"at": "coordinator"})
    keys = tmp_path / "keys"
    make_keys(keys, list(SITES))
    fed = federation(config, keys)
    fed.start_coordinator()
    for s in SITES:
        fed.start_site(s, data[s])
    assert fed.wait_finished() == 0, fed.log("coordinator")
    assert "router fitted on" in fed.log("coordinator")

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
            torch.testing.assert_close(a[n], w, rtol=0, atol=1e-5)
    # every site trained its own drawn path each round, as locally; bytes down per site
    # are one path's, not the grid's
    path_bytes = 4 * sum(t.numel() for t in local.model.parameters())
    rounds = [[r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "site"]
              for out in (fed.out, tmp_path / "local")]
    assert sorted((r["round"], r["site"], r["accepted"]) for r in rounds[0]) == \
        sorted((r["round"], r["site"], r["accepted"]) for r in rounds[1])
    assert all(path_bytes < r["bytes_down"] < path_bytes + 200_000 for r in rounds[0])
