"""What the demo says about its own cost before it starts."""

from __future__ import annotations

import torch

from atoll.app.run_config import load_run_config
from atoll.app.step_clock import bare_step_seconds, run_cost_in_steps
from atoll.model import ModelConfig
from atoll.tokenizer import byte_tokenizer


def test_run_cost_counts_sites_baselines_credit_and_evaluation(tmp_path):
    cfg_file = tmp_path / "fed.toml"
    cfg_file.write_text("""
[federation]
rounds = 10
steps_per_round = 3
[inner]
batch_size = 16
[eval]
batch_size = 8
max_batches = 2
every = 5
[credit]
batches = 1
[baseline]
kinds = ["data_parallel"]
[[sites]]
name = "a"
data = "a"
[[sites]]
name = "b"
data = "b"
""")
    cfg = load_run_config(cfg_file, [], base=tmp_path, simulation=False)
    inner = 10 * 3 * 2  # rounds x H x sites
    baseline = inner  # the sites' batches combined, as many steps
    credit = 10 * 2 * 1 * 0.5 * 2 / 3  # rounds x domains x batches x (8/16) x fwd+bwd
    evaluation = 3 * 2 * 2 * 2 * 0.5 / 3  # (round 0, 5, 10) x runs x domains x batches
    assert run_cost_in_steps(cfg) == inner + baseline + credit + evaluation


def test_bare_step_leaves_the_model_untouched():
    model = ModelConfig("tiny").build(byte_tokenizer(), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seconds = bare_step_seconds(model, batch=2, seq_len=16, steps=2)
    assert seconds > 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
