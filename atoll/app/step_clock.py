"""How fast this machine takes one bare training step, and what a run costs in such steps.

Machines of one kind differ in speed by nearly 2x, so a run's length is stated in bare
steps (forward, backward, clip, AdamW on the run's model and batch, nothing else) and the
clock time follows from one measurement made before the run starts.
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel

from atoll.app.run_config import RunConfig


def bare_step_seconds(model: PreTrainedModel, batch: int, seq_len: int, steps: int = 3,
                      seed: int = 0) -> float:
    """The median seconds of ``steps`` bare training steps of a copy of ``model`` on random
    tokens (one warm-up step first; ``model`` itself is left untouched)."""
    import copy

    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def run_cost_in_steps(cfg: RunConfig) -> float:
    """What a simulated run costs, in bare steps at the inner batch size: every site's inner
    steps; each baseline's steps on the sites' batches combined (so as many as the sites');
    valuing every round's updates (a forward and backward pass, about 2/3 of a step, per
    credit batch and domain); and the forward passes of evaluating the federation and each
    baseline (1/3 of a step per batch)."""
    f, sites = cfg.federation, len(cfg.sites)
    steps = f.rounds * f.steps_per_round * sites
    baselines = len(cfg.baseline.kinds) * steps
    batch_ratio = cfg.eval.batch_size / cfg.inner.batch_size
    credit = f.rounds * sites * cfg.credit.batches * batch_ratio * 2 / 3
    every = max(1, cfg.eval.every)
    evals = 1 + f.rounds // every + (1 if f.rounds % every else 0)  # round 0, each `every`, last
    evaluation = (evals * (1 + len(cfg.baseline.kinds)) * sites * cfg.eval.max_batches
                  * batch_ratio / 3)
    return steps + baselines + credit + evaluation


class RoundClock:
    """The time a run has left, at the pace of the rounds this process has run so far."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self._start: tuple[float, int] | None = None  # (when, round) the ETA counts from

    def eta(self, r: int) -> str:
        """``  ETA 42s`` after round ``r`` ("" until two rounds were seen, and at the end)."""
        if self._start is None:
            self._start = (time.perf_counter(), r)
            return ""
        t0, r0 = self._start
        left = self.rounds - r
        if left <= 0 or r <= r0:
            return ""
        return f"  ETA {(time.perf_counter() - t0) / (r - r0) * left:.0f}s"
