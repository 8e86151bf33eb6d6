"""Round semantics: partial participation, bad updates refused, one failing site isolated."""

from __future__ import annotations

import copy

import torch

from atoll.app.metrics import read_metrics
from atoll.app.run_config import EvalSet
from atoll.app.simulate import simulate
from atoll.federation.checks import ChecksConfig
from atoll.federation.codecs import CodecConfig, encode
from atoll.federation.coordinator import Coordinator
from atoll.federation.protocol import SiteUpdate
from atoll.federation.settings import CoordinatorConfig, FederationConfig
from atoll.train.inner import InnerConfig
from atoll.train.outer import OuterConfig
from tests.conftest import small_config


def coordinator(sites_per_round: int = 0) -> Coordinator:
    weights = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    return Coordinator(weights, CoordinatorConfig(
        run_id="run", seed=1, model_config={}, seq_len=8, total_steps=10,
        federation=FederationConfig(rounds=5, steps_per_round=2, sites_per_round=sites_per_round),
        outer=OuterConfig(lr=1.0, momentum=0.0, nesterov=False), inner=InnerConfig(),
        # these hand-made updates repeat themselves on purpose
        checks=ChecksConfig(reject_replay=False, max_norm_ratio=0)))


def update(site: str, round_: int = 1, value: float = 1.0, tokens: int = 10, **delta) -> SiteUpdate:
    d = {"w": torch.full((2, 3), value), "b": torch.full((3,), value)}
    d.update(delta)
    return SiteUpdate(run_id="run", round=round_, site=site, delta=encode(d, CodecConfig()),
                      tokens=tokens, steps=2,
                      train_loss=1.0, seconds=0.1, compute_seconds=0.1)


def test_weighted_mean_of_accepted_updates_only():
    c = coordinator()
    c.open_round(["a", "b", "c"])
    assert c.accept(update("a", value=1.0, tokens=10)) is None
    assert c.accept(update("b", value=4.0, tokens=30)) is None
    assert "NaN" in c.accept(update("c", value=float("nan")))
    out = c.close()
    assert out.accepted == ["a", "b"] and "c" in out.rejected
    # FedAvg: theta = 0 - (10*1 + 30*4)/40
    assert torch.allclose(c.weights["w"], torch.full((2, 3), -3.25))
    assert c.step == 2 and c.tokens == 40 and c.round == 1


def test_rejections_name_the_reason():
    c = coordinator()
    c.open_round(["a", "b"])
    assert "stale" in c.accept(update("a", round_=0))
    assert "shape" in c.accept(update("b", w=torch.zeros(3, 2)))
    assert "not asked" in c.accept(update("zed"))
    assert c.accept(update("a")) is None
    assert "not asked" in c.accept(update("a"))  # a second update from the same site


def test_round_with_nothing_valid_leaves_weights_untouched():
    c = coordinator()
    before = copy.deepcopy(c.weights)
    c.open_round(["a"])
    c.accept(update("a", b=torch.full((3,), float("inf"))))
    out = c.close()
    assert not out.applied and c.round == 1 and c.step == 0
    assert all(torch.equal(before[k], c.weights[k]) for k in before)


def test_partial_participation_is_seeded():
    picks = []
    for _ in range(2):
        c = coordinator(sites_per_round=2)
        rounds = []
        for _ in range(4):
            chosen = c.select(["a", "b", "c", "d"])
            rounds.append(chosen)
            c.open_round(chosen)
            c.close()
        picks.append(rounds)
    assert picks[0] == picks[1]
    assert all(len(r) == 2 for r in picks[0])
    assert len({tuple(r) for r in picks[0]}) > 1  # not the same pair every round


def test_a_broken_site_does_not_stop_the_others(demo_data, tmp_path):
    cfg = small_config(demo_data, ["code", "scripture"], federation={"rounds": 2})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    cfg.sites[1].data = str(broken)
    cfg.eval.sets = [EvalSet("code", str(demo_data["code"]))]
    run = simulate(cfg, tmp_path / "run", report=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    fails = [r for r in records if r["kind"] == "site" and r["site"] == "scripture"]
    assert len(fails) == 2 and all(not r["accepted"] for r in fails)
    assert "manifest is not valid JSON" in fails[0]["reason"]
    assert run.coordinator.round == 2 and run.coordinator.tokens > 0


def test_late_update_is_applied_next_round_with_a_staleness_discount():
    c = coordinator()
    c.cfg.federation.max_staleness = 1
    c.open_round(["a", "b"])
    assert c.accept(update("a", round_=1, value=1.0, tokens=10)) is None
    c.reject("b", "no reply within the 5s deadline")
    c.close()  # theta = 0 - 1 = -1 (FedAvg of a alone)
    c.open_round(["a"])
    assert c.accept(update("a", round_=2, value=1.0, tokens=10)) is None
    assert c.accept(update("b", round_=1, value=4.0, tokens=10)) is None  # one round late
    out = c.close()
    assert out.accepted == ["a"] and out.late == ["b"]
    # weights 10 (a, on time) and 10 / (1 + 1) = 5 (b, late): mean = (10*1 + 5*4) / 15 = 2
    assert torch.allclose(c.weights["w"], torch.full((2, 3), -1.0 - 2.0))
    assert c.tokens == 30 and c.step == 4  # the clock follows on-time updates only


def test_too_late_or_unexpected_late_updates_are_rejected():
    c = coordinator()
    c.cfg.federation.max_staleness = 1
    for r in (1, 2):
        c.open_round(["a", "b"])
        c.accept(update("a", round_=r))
        c.close()  # b missed rounds 1 and 2
    c.open_round(["a", "b"])
    assert "stale" in c.accept(update("b", round_=1))  # two rounds late: too late
    assert "stale" in c.accept(update("a", round_=2))  # a delivered round 2 already
    assert c.accept(update("b", round_=2)) is None


def test_slow_site_update_arrives_late_and_counts(demo_data, tmp_path):
    """Parallel local engine: a site paced 1 s per step misses a 2 s deadline; its update
    lands in a later round, discounted, instead of being thrown away."""
    cfg = small_config(demo_data, ["code", "speeches"], parallel=True,
                       federation={"rounds": 4, "steps_per_round": 3, "deadline_s": 2.0,
                                   "max_staleness": 3})
    cfg.sites[0].pace_s = 0.4  # 1.2 s per round: on time
    cfg.sites[1].pace_s = 1.0  # 3 s per round: misses the 2 s deadline
    simulate(cfg, tmp_path / "run", report=False)
    rounds = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if r["kind"] == "round" and r["round"] > 0]
    assert all(r["sites"] == ["code"] for r in rounds)
    assert "no reply" in rounds[0]["rejected"]["speeches"]
    late = [r["round"] for r in rounds if "speeches" in r["late"]]
    assert late and late[0] > 1, rounds
