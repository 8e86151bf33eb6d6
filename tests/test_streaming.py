"""Streaming sync (Streaming DiLoCo): fragments, one synced per round, and overlap."""

from __future__ import annotations

import pytest
import torch

from atoll.app.metrics import read_metrics
from atoll.app.run import Run
from atoll.app.simulate import simulate
from atoll.data.reader import PackedReader, TokenDataset
from atoll.engines.local import LocalEngine
from atoll.federation.fragments import fragment_of_round, split_fragments
from atoll.federation.rounds import run_round
from atoll.federation.site import Site, data_seed
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
    """Overlap: in round 2 the site first trains 2 of its 4 steps (while fragment 0, synced
    in round 1, is on the wire), then merges it, local = alpha * local + (1 - alpha) *
    global, and trains the other 2. Fragment 1 is left as the site trained it. Checked by
    hand on the weights the site's trainer had when the overlap ended and when it resumed."""
    cfg = small_config(demo_data, ["code"],
                       federation={"rounds": 2, "steps_per_round": 4, "fragments": 2,
                                   "overlap_steps": 2, "merge_alpha": 0.25})
    run = Run(cfg, tmp_path / "run")
    site = Site("code", demo_data["code"], tmp_path / "state")
    engine = LocalEngine([site])
    try:
        run_round(run.coordinator, engine)  # round 1: the whole model down, no overlap
        sent = {n: w.clone() for n, w in run.coordinator.weights.items()}  # round 2's plan
        stretches = record_stretches(site.trainer)
        second = run_round(run.coordinator, engine)
    finally:
        engine.close()
        run.close()
    groups = split_fragments(sent, 2)
    assert [steps for _, _, steps in stretches] == [2, 2]
    assert [r.steps for r in second.replies] == [4] and second.outcome.accepted == ["code"]
    overlap_end, merged = stretches[0][1], stretches[1][0]
    moved = max((overlap_end[n] - sent[n]).abs().max().item() for n in groups[0])
    assert moved > 1e-3  # the site's fragment 0 is not the global one: the merge shows
    for n in groups[0]:
        want = 0.25 * overlap_end[n] + 0.75 * sent[n]
        torch.testing.assert_close(merged[n], want, rtol=0, atol=1e-6)  # ulps
    for n in groups[1]:
        assert torch.equal(merged[n], overlap_end[n]), n


def record_stretches(trainer) -> list[tuple[dict, dict, int]]:
    """Wrap ``trainer.run``: for each stretch of training, the model's weights before and
    after it and the steps it took."""
    stretches, inner = [], trainer.run

    def weights() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def run(*args, **kwargs):
        before = weights()
        result = inner(*args, **kwargs)
        stretches.append((before, weights(), result.steps))
        return result

    trainer.run = run
    return stretches
