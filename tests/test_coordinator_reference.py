"""The coordinator's streamed aggregation and outer step against a plain reference.

The coordinator decodes each update one tensor at a time, folds it into a running sum and
steps the weights with a per-tensor SGD. The reference does it the obvious way: every
update decoded whole, the token-weighted mean computed whole, then ``torch.optim.SGD``
(Nesterov momentum) stepping on that pseudo-gradient. Three rounds on the tiny preset, so
the momentum carried between rounds matters, with fp32 and int8 updates.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from atoll.federation.checks import ChecksConfig
from atoll.federation.codecs import decode, encode, parse_spec, round_seed
from atoll.federation.coordinator import Coordinator
from atoll.federation.protocol import SiteUpdate
from atoll.federation.settings import CoordinatorConfig, FederationConfig
from atoll.model import PRESETS
from atoll.train.outer import OuterConfig

TOKENS = {"a": 40, "b": 256, "c": 100}  # unequal on purpose: the weights must matter
ROUNDS = 3


def tiny_weights() -> dict[str, torch.Tensor]:
    """The tiny preset's initial weights, float32, from a fixed seed."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(PRESETS["tiny"](256), dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def site_deltas(weights: dict[str, torch.Tensor], site: str, r: int) -> dict[str, torch.Tensor]:
    """A pseudo-gradient of ``site`` in round ``r``: seeded noise of a plausible size."""
    g = torch.Generator().manual_seed(1000 * r + ord(site))
    return {n: torch.randn(w.shape, generator=g) * 1e-2 for n, w in weights.items()}


@pytest.mark.parametrize("codec", ["fp32", "int8/64"])
def test_streamed_outer_step_equals_the_whole_model_reference(codec):
    weights = tiny_weights()
    cfg = CoordinatorConfig(
        run_id="ref", model_config={}, seq_len=8, total_steps=100,
        federation=FederationConfig(rounds=ROUNDS, steps_per_round=2), up=parse_spec(codec),
        outer=OuterConfig(lr=0.7, momentum=0.9, nesterov=True),
        checks=ChecksConfig(reject_replay=False, max_norm_ratio=0))
    coord = Coordinator(weights, cfg)
    ref = {n: w.clone() for n, w in weights.items()}
    opt = torch.optim.SGD(list(ref.values()), lr=0.7, momentum=0.9, nesterov=True)
    shapes = {n: w.shape for n, w in weights.items()}
    for r in range(1, ROUNDS + 1):
        coord.open_round(sorted(TOKENS))
        seed = round_seed("ref", r)
        wire = {s: encode(site_deltas(weights, s, r), cfg.up, seed) for s in TOKENS}
        for s in ("c", "a", "b"):  # arrival order, not plan order
            assert coord.accept(SiteUpdate(
                run_id="ref", round=r, site=s, tokens=TOKENS[s], steps=2, train_loss=1.0,
                seconds=0.1, compute_seconds=0.1, codec=cfg.up.spec, delta=wire[s])) is None
        assert coord.close().applied
        # the reference: whole updates, the whole mean (products summed in arrival order,
        # as a sum of floats is order-dependent), then torch's SGD on it
        decoded = {s: decode(wire[s], shapes, cfg.up, seed) for s in TOKENS}
        total = float(sum(TOKENS.values()))
        mean = {n: sum((decoded[s][n] * float(TOKENS[s]) for s in ("c", "a", "b")),
                       torch.zeros(shapes[n])) / total for n in shapes}
        unweighted = {n: sum(decoded[s][n] for s in TOKENS) / len(TOKENS) for n in shapes}
        assert max((mean[n] - unweighted[n]).abs().max().item() for n in shapes) > 1e-4
        for n, p in ref.items():
            p.grad = mean[n]
        opt.step()
        for n, p in ref.items():
            assert torch.equal(coord.weights[n], p), (r, n)
            buf = coord.outer.optimizer.state[coord.weights[n]]["momentum_buffer"]
            assert torch.equal(buf, opt.state[p]["momentum_buffer"]), (r, n)
    moved = max((ref[n] - weights[n]).abs().max().item() for n in ref)
    assert moved > 1e-3  # three steps of ~1e-2 noise: the weights did move
