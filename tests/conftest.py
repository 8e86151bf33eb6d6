"""Shared fixtures: small prepared corpora from the demo domains and a fast run config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from atoll.app.run_config import RunConfig
from atoll.config import from_dict
from atoll.data.demo import build_demo_data

torch.set_num_threads(1)
# Tests that check DP noise against a reference draw it from a seed; nothing else may.
os.environ["ATOLL_TEST_NOISE_SEED"] = "1"
# The coordinator's ledger keys (kept outside run folders) go to a folder of the test run.
os.environ.setdefault("ATOLL_LEDGER_KEYS", tempfile.mkdtemp(prefix="atoll-ledger-keys-"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four demo domains, 120k tokens each, rows of 64 tokens."""
    root = tmp_path_factory.mktemp("demo-data")
    return build_demo_data(root, tokens_per_domain=120_000, seq_len=64, log=lambda s: None)


def small_config(data: dict[str, Path], sites: list[str] | None = None, **sections: dict
                 ) -> RunConfig:
    """A run config that trains in seconds: tiny model, short rows, few steps, no baseline."""
    tree = {
        "name": "test", "seed": 0, "threads": 1,
        "data": {"seq_len": 64},
        "inner": {"lr": 3e-3, "warmup_steps": 2, "batch_size": 4},
        "outer": {"lr": 0.7, "momentum": 0.9, "nesterov": True},
        "federation": {"rounds": 3, "steps_per_round": 3},
        "eval": {"batch_size": 8, "max_batches": 2},
        "baseline": {"kinds": []},
        "sites": [{"name": n, "data": str(data[n])} for n in (sites or list(data))],
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return from_dict(RunConfig, tree)


ONE_AT_A_TIME = pytest.mark.xdist_group("real-processes")
"""For tests that start real Flower processes (SuperLink, SuperNodes, ServerApps,
ClientApps) or a browser beside a running simulation. `make test` runs the suite on two
pytest-xdist workers (``--dist loadgroup``); tests with this mark go one at a time to one of
them, so two federations of processes never share the two cores and their heartbeats and
deadlines see the machine they were written for."""
