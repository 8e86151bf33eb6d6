"""A run stopped mid-round and resumed equals the uninterrupted run: weights and metrics."""

from __future__ import annotations

import pytest
import torch

from atoll.app.metrics import read_metrics
from atoll.app.run import Run
from atoll.app.simulate import simulate
from atoll.engines.local import LocalEngine
from tests.conftest import small_config


class Crash(Exception):
    """Stands for the coordinator process being killed."""


class CrashingEngine(LocalEngine):
    """A local engine that dies in round ``at`` after the first site has trained."""

    def __init__(self, sites, at: int) -> None:
        super().__init__(sites)
        self.at = at

    def exchange(self, plans, deadline_s=0.0):
        for i, reply in enumerate(super().exchange(plans, deadline_s)):
            if reply.round == self.at and i == 1:
                raise Crash
            yield reply


def crash_in_round(cfg, out, at: int) -> Run:
    """Run ``cfg`` into ``out`` until the coordinator dies in round ``at``; the run, closed
    (the crashed process is gone, and its lock on the folder with it)."""
    from atoll.federation.site import Site

    run = Run(cfg, out)
    with pytest.raises(Crash):
        run.execute(CrashingEngine([Site(s.name, s.data, out / "sites" / s.name)
                                    for s in cfg.sites], at=at))
    run.close()
    return run


WALL_CLOCK = {"seconds", "compute_seconds", "ended"}
BYTES = {"bytes_up", "bytes_down", "eval_bytes"}


def comparable(records):
    """Metrics without wall-clock fields (they differ between any two runs) and byte counts
    (a message header carries the site's timings, whose printed length varies)."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK | BYTES} for r in records]


def assert_bytes_close(a, b, slack=64):
    for ra, rb in zip(a, b, strict=True):
        for k in BYTES & ra.keys():
            assert abs(ra[k] - rb[k]) <= slack * max(1, len(ra.get("sites", [1]))), (k, ra, rb)


@pytest.mark.parametrize("extra", [
    {},  # DiLoCo, partial participation, a baseline
    # streaming with overlap, int8 + error feedback up, bf16 down: more site state to restore
    {"federation": {"fragments": 2, "overlap_steps": 1},
     "comm": {"up": {"kind": "int8"}, "down": {"kind": "bf16"}}},
    # int4 changes down: the coordinator's copy of what the sites hold, and theirs
    {"comm": {"up": {"kind": "int4"}, "down": {"kind": "int4", "delta": True}}},
])
def test_resume_equals_uninterrupted(demo_data, tmp_path, extra):
    fed = {"rounds": 4, "steps_per_round": 3, "sites_per_round": 2, **extra.get("federation", {})}
    cfg = small_config(demo_data, ["code", "scripture", "speeches"],
                       outer={"lr": 0.7, "momentum": 0.9, "nesterov": True}, federation=fed,
                       baseline={"kinds": ["data_parallel"]}, comm=extra.get("comm", {}))
    straight = simulate(cfg, tmp_path / "straight", report=False)

    from atoll.federation.site import Site

    out = tmp_path / "crashed"
    run = Run(cfg, out)
    sites = [Site(s.name, s.data, out / "sites" / s.name) for s in cfg.sites]
    with pytest.raises(Crash):
        run.execute(CrashingEngine(sites, at=3))
    assert run.checkpoints()[-1] == 2  # round 3 never closed
    run.close()  # the crashed process is gone, and its lock on the folder with it

    resumed = simulate(cfg, out, resume=True, report=False)
    for n, w in straight.coordinator.weights.items():
        assert torch.equal(w, resumed.coordinator.weights[n]), n
    for a, b in zip(straight.baselines, resumed.baselines, strict=True):
        for (n, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
            assert torch.equal(p, q), n
    resumed_metrics = read_metrics(out / "metrics.jsonl")
    straight_metrics = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert comparable(resumed_metrics) == comparable(straight_metrics)
    assert_bytes_close(resumed_metrics, straight_metrics)
