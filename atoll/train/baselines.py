"""Centralised baselines: what a data centre would have done with the same tokens.

Two comparisons (as DiLoCo and Photon report them):

* ``data_parallel``: every step takes one batch from *each* site and averages the gradient,
  i.e. the sites' batches combined, for the same number of sequential steps as the
  federation. This is the headline comparison: the same machines inside one data centre.
* ``sequential``: one worker with one site's batch, taking steps x sites steps, drawing from
  the sites in turn: the most a single machine could make of the tokens.

Both read the union of the sites' data through their own readers (the sites' cursors are not
touched) and train until they have seen as many tokens as the federation, on the device
and in the precision the sites train in.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from atoll.consent.pool import consent_filter
from atoll.data.reader import PackedReader, TokenDataset
from atoll.train.device import resolve_device
from atoll.train.inner import InnerConfig, InnerTrainer, TrainResult
from atoll.util.hashing import seed_of
from atoll.util.weights import load_weights

BASELINE_KINDS = ("data_parallel", "sequential")
"""``data_parallel``: the sites' batches combined, the same number of steps (the headline);
``sequential``: one site's batch, steps x sites."""


class CentralisedBaseline:
    """A model trained on the union of the sites' data, kept level with the federation."""

    def __init__(self, kind: str, model: torch.nn.Module, inner: InnerConfig,
                 data_dirs: list[str | Path], seq_len: int, seed: int, total_steps: int,
                 purpose: str = "pretraining", device: str = "cpu") -> None:
        if kind not in BASELINE_KINDS:
            raise ValueError(f"unknown baseline kind {kind!r}")
        self.kind = kind
        self.model = model.to(resolve_device(device))
        n = len(data_dirs)
        steps = total_steps if kind == "data_parallel" else total_steps * n
        self.trainer = InnerTrainer(model, inner, steps)
        self.data_dirs, self.purpose = list(data_dirs), purpose
        self.readers = []
        for i, d in enumerate(data_dirs):
            s = seed_of("baseline", seed, i)
            self.readers.append(PackedReader(TokenDataset(d, "train", seq_len), inner.batch_size,
                                             seed=s, allow=consent_filter(d, purpose)))
        per_batch = inner.batch_size * seq_len * inner.grad_accum
        self.tokens_per_step = per_batch * (n if kind == "data_parallel" else 1)
        self.tokens = 0
        self._turn = 0  # sequential: which site's data the next step reads

    @property
    def name(self) -> str:
        """The ``run`` of this baseline's metrics records, ``baseline:<kind>``."""
        return f"baseline:{self.kind}"

    def _micro_batches(self) -> list[torch.Tensor]:
        accum = self.trainer.cfg.grad_accum
        if self.kind == "data_parallel":
            return [r.next_batch() for r in self.readers for _ in range(accum)]
        reader = self.readers[self._turn % len(self.readers)]
        self._turn += 1
        return [reader.next_batch() for _ in range(accum)]

    def train_to(self, tokens: int) -> TrainResult | None:
        """Take steps until the baseline has seen (about) ``tokens`` tokens in all."""
        steps = round((tokens - self.tokens) / self.tokens_per_step)
        if steps <= 0:
            return None
        for reader, d in zip(self.readers, self.data_dirs, strict=True):
            reader.allow = consent_filter(d, self.purpose)  # consent as of this round
        loss_sum = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            loss_sum += self.trainer.train_step(self._micro_batches())
        self.tokens += steps * self.tokens_per_step
        seconds = time.perf_counter() - start
        return TrainResult(steps, steps * self.tokens_per_step, loss_sum / steps, seconds,
                           seconds)

    def state_dict(self) -> dict:
        """Weights, optimizer, readers and token count, for the run's checkpoint."""
        return {"kind": self.kind, "tokens": self.tokens, "turn": self._turn,
                "weights": {n: p.detach().to("cpu", copy=True)
                            for n, p in self.model.named_parameters()},
                "trainer": self.trainer.state_dict(),
                "readers": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`, exactly where it stopped."""
        load_weights(self.model, state["weights"])
        self.trainer.load_state_dict(state["trainer"])
        for r, s in zip(self.readers, state["readers"], strict=True):
            r.load_state_dict(s)
        self.tokens = int(state["tokens"])
        self._turn = int(state["turn"])
