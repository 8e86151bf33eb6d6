"""Numerics against references: the schedule by hand, the inner loop against a plain torch
loop, the outer Nesterov step against its textbook formula, FedAvg(1 site) against plain
training."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from atoll.app.simulate import simulate
from atoll.data.reader import PackedReader, TokenDataset
from atoll.federation.site import data_seed
from atoll.model import ModelConfig
from atoll.tokenizer import byte_tokenizer
from atoll.train.inner import InnerConfig, InnerTrainer
from atoll.train.outer import OuterConfig, OuterOptimizer
from atoll.train.schedule import warmup_cosine
from tests.conftest import small_config


def test_schedule_by_hand():
    lr = [warmup_cosine(s, 1.0, 10, 110, 0.1) for s in (0, 4, 9, 10, 60, 110, 500)]
    assert lr == pytest.approx([0.1, 0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 2)),
                                0.1, 0.1])


def plain_adamw_loop(model, batches, cfg: InnerConfig, total_steps: int):
    """The textbook loop: AdamW (no decay on vectors), warm-up + cosine, clipping."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    for step, batch in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
    return model


def test_inner_trainer_equals_plain_loop():
    model = ModelConfig().build(byte_tokenizer(), seed=1)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 257, (4, 32), generator=g) for _ in range(6)]
    cfg = InnerConfig(lr=1e-2, warmup_steps=2, grad_clip=0.5)
    trainer = InnerTrainer(model, cfg, total_steps=6)
    it = iter(batches)
    result = trainer.run(lambda: next(it), max_steps=6)
    plain_adamw_loop(reference, batches, cfg, total_steps=6)
    assert result.steps == 6 and result.tokens == 6 * 4 * 32
    for (n, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_outer_nesterov_equals_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in theta.items()} for _ in range(4)]
    outer = OuterOptimizer(theta, OuterConfig(lr=0.7, momentum=0.9, nesterov=True))
    ref = {k: v.clone() for k, v in theta.items()}
    buf: dict[str, torch.Tensor] = {}
    for pg in grads:
        outer.step(pg)
        for k in ref:  # Sutskever/PyTorch Nesterov: b = m*b + g; theta -= lr * (g + m*b)
            buf[k] = pg[k].clone() if k not in buf else 0.9 * buf[k] + pg[k]
            ref[k] = ref[k] - 0.7 * (pg[k] + 0.9 * buf[k])
    for k in ref:
        torch.testing.assert_close(outer.weights[k], ref[k], rtol=1e-6, atol=1e-6)


def test_fedavg_step_lands_on_the_mean():
    theta = {"w": torch.tensor([1.0, 2.0])}
    outer = OuterOptimizer(theta, OuterConfig(lr=1.0, momentum=0.0, nesterov=False))
    site_a, site_b = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 6.0])
    # token-weighted mean of the pseudo-gradients, weights 1:3
    mean = (1 * (theta["w"] - site_a) + 3 * (theta["w"] - site_b)) / 4
    outer.step({"w": mean})
    assert torch.allclose(outer.weights["w"], (1 * site_a + 3 * site_b) / 4)


def test_fedavg_with_one_site_equals_plain_training(demo_data, tmp_path):
    """FedAvg (outer lr 1, momentum 0) with one site and the inner state kept across rounds
    is plain training: 3 rounds x 4 steps == 12 straight steps on the same batches."""
    cfg = small_config(demo_data, ["code"], outer={"lr": 1.0, "momentum": 0.0,
                                                    "nesterov": False},
                       federation={"rounds": 3, "steps_per_round": 4})
    run = simulate(cfg, tmp_path / "run", report=False)

    model = cfg.model.build(byte_tokenizer(), seed=cfg.seed)
    reader = PackedReader(TokenDataset(demo_data["code"], "train", cfg.data.seq_len),
                          cfg.inner.batch_size, seed=data_seed(cfg.seed, "code"))
    plain_adamw_loop(model, [reader.next_batch() for _ in range(12)], cfg.inner,
                     total_steps=12)
    for n, p in model.named_parameters():
        # theta - (theta - theta_site) is theta_site up to float32 rounding
        torch.testing.assert_close(run.coordinator.weights[n], p.detach(), rtol=0, atol=2e-6)


def test_gradient_accumulation_equals_the_combined_batch():
    """Two micro-batches of 4 accumulate to the gradient of one batch of 8. In float64:
    the two sums round differently, and AdamW divides by sqrt(v), which turns a float32
    rounding difference on a near-zero gradient into a visible weight difference."""
    model = ModelConfig().build(byte_tokenizer(), seed=2).double()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    micro = [torch.randint(0, 257, (4, 32), generator=g) for _ in range(4)]
    cfg = InnerConfig(lr=1e-2, warmup_steps=0, grad_accum=2)
    it = iter(micro)
    InnerTrainer(model, cfg, total_steps=2).run(lambda: next(it), max_steps=2)
    combined = [torch.cat(micro[0:2]), torch.cat(micro[2:4])]
    plain_adamw_loop(reference, combined, cfg, total_steps=2)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_reset_state_starts_each_round_with_fresh_adamw(demo_data, tmp_path):
    from atoll.util.storage import load_state

    for reset, expected_steps in ((False, 3 * 2), (True, 3)):
        cfg = small_config(demo_data, ["code"], inner={"reset_state": reset},
                           federation={"rounds": 2, "steps_per_round": 3})
        simulate(cfg, tmp_path / f"run-{reset}", report=False)
        state = load_state(tmp_path / f"run-{reset}" / "sites" / "code" / "round-00002")
        adam_step = next(iter(state["trainer"]["optimizer"]["state"].values()))["step"]
        assert int(adam_step) == expected_steps
        assert state["trainer"]["step"] == 6  # the schedule clock runs on either way


def test_time_budget_rounds(demo_data, tmp_path):
    """With a time budget each site takes as many steps as fit; the clock follows them."""
    cfg = small_config(demo_data, ["code", "speeches"], inner={"total_steps": 100},
                       federation={"rounds": 2, "steps_per_round": 0, "time_budget_s": 0.5})
    run = simulate(cfg, tmp_path / "run", report=False)
    from atoll.app.metrics import read_metrics

    sites = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "site"]
    assert len(sites) == 4 and all(r["steps"] >= 1 and r["accepted"] for r in sites)
    assert all(r["seconds"] >= 0.5 for r in sites)
    assert run.coordinator.step > 0
