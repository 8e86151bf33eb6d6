"""Streaming sync (Streaming DiLoCo): fragments, one synced per round, and overlap."""

from __future__ import annotations

import pytest
import torch

from atoll.app.metrics import read_metrics
from atoll.app.simulate import simulate
from atoll.data.reader import PackedReader, TokenDataset
from atoll.federation.fragments import fragment_of_round, split_fragments
from atoll.federation.site import data_seed
from atoll.model import ModelConfig
from atoll.tokenizer import byte_tokenizer
from tests.conftest import small_config
from tests.test_training import plain_adamw_loop

FEDAVG = {"lr": 1.0, "momentum": 0.0, "nesterov": False}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_fragments_partition_the_model_evenly(n):
    named = dict(ModelConfig().build(byte_tokenizer()).named_parameters())
    groups = split_fragments(named, n)
    assert len(groups) == n
    assert [x for g in groups for x in g] == list(named)  # contiguous, in model order
    sizes = [sum(named[x].numel() for x in g) for g in groups]
    assert max(sizes) < 2.2 * sum(sizes) / n
    assert [fragment_of_round(r, n) for r in range(1, 2 * n + 1)] == list(range(n)) * 2


def test_one_site_streaming_fedavg_is_plain_training_fragment_by_fragment(demo_data, tmp_path):
    """With one site and FedAvg, a fragment synced in round r holds the site's weights after
    r x H steps; the site itself trains on undisturbed. 4 rounds, 2 fragments, H = 3:
    fragment 0 was last synced after 9 steps, fragment 1 after 12."""
    cfg = small_config(demo_data, ["code"], outer=FEDAVG,
                       federation={"rounds": 4, "steps_per_round": 3, "fragments": 2},
                       inner={"total_steps": 12})
    run = simulate(cfg, tmp_path / "run", report=False)
    groups = split_fragments(run.coordinator.weights, 2)

    model = cfg.model.build(byte_tokenizer(), seed=cfg.seed)
    reader = PackedReader(TokenDataset(demo_data["code"], "train", cfg.data.seq_len),
                          cfg.inner.batch_size, seed=data_seed(cfg.seed, "code"))
    batches = [reader.next_batch() for _ in range(12)]
    # the same optimizer instance must run on: replay 9 steps, snapshot, then the full 12
    after_9 = {n: p.detach().clone() for n, p in plain_adamw_loop(
        cfg.model.build(byte_tokenizer(), seed=cfg.seed), batches[:9], cfg.inner,
        total_steps=12).named_parameters()}
    after_12 = dict(plain_adamw_loop(model, batches, cfg.inner, total_steps=12)
                    .named_parameters())
    for n in groups[0]:
        torch.testing.assert_close(run.coordinator.weights[n], after_9[n], rtol=0, atol=2e-6)
    for n in groups[1]:
        torch.testing.assert_close(run.coordinator.weights[n], after_12[n].detach(), rtol=0,
                                   atol=2e-6)


def test_fragments_cut_the_bytes_per_round(demo_data, tmp_path):
    def per_round(fragments: int) -> dict:
        cfg = small_config(demo_data, ["code", "speeches"],
                           federation={"rounds": 3, "steps_per_round": 2,
                                       "fragments": fragments})
        simulate(cfg, tmp_path / f"f{fragments}", report=False)
        return [r for r in read_metrics(tmp_path / f"f{fragments}" / "metrics.jsonl")
                if r["kind"] == "round" and r["round"] > 0]

    whole, quarter = per_round(1), per_round(4)
    assert whole[-1]["bytes_up"] / quarter[-1]["bytes_up"] == pytest.approx(4, rel=0.25)
    assert quarter[0]["bytes_down"] == pytest.approx(whole[0]["bytes_down"], rel=0.01)  # full
    assert whole[-1]["bytes_down"] / quarter[-1]["bytes_down"] == pytest.approx(4, rel=0.25)


def test_overlap_trains_before_merging(demo_data, tmp_path):
    """Overlap changes the numbers (the merge mixes in steps taken meanwhile) but not the
    amount of work: every round still takes steps_per_round steps per site."""
    base = {"rounds": 3, "steps_per_round": 4, "fragments": 2}
    plain = simulate(small_config(demo_data, ["code", "scripture"], federation=base),
                     tmp_path / "a", report=False)
    over = simulate(small_config(demo_data, ["code", "scripture"],
                                 federation={**base, "overlap_steps": 2}),
                    tmp_path / "b", report=False)
    sites = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "site"]
    assert all(r["steps"] == 4 and r["accepted"] for r in sites)
    assert over.coordinator.step == plain.coordinator.step == 12
    assert any(not torch.equal(plain.coordinator.weights[n], w)
               for n, w in over.coordinator.weights.items())
