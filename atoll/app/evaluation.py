"""What a run evaluates on: each domain's held-out rows, read through consent like training."""

from __future__ import annotations

from pathlib import Path

import torch

from atoll.app.run_config import RunConfig
from atoll.train.evaluate import held_out_batches, validation_loss


def eval_sets(cfg: RunConfig) -> dict[str, list[torch.Tensor]]:
    """Domain name -> validation batches: ``eval.sets``, or else each site's held-out rows."""
    e = cfg.eval
    sets = [(s.name, s.data) for s in e.sets] or [
        (s.name, s.data) for s in cfg.sites if s.data and Path(s.data).is_dir()]
    out = {}
    for name, data in sets:
        batches = held_out_batches(data, cfg.data.seq_len, e.batch_size, e.max_batches,
                                   cfg.purpose)
        if batches:
            out[name] = batches
    return out


def evaluate(model: torch.nn.Module, sets: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Validation loss of ``model`` per domain."""
    return {name: validation_loss(model, batches) for name, batches in sets.items()}
