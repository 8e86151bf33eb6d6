"""Validation loss: mean next-token cross-entropy (nats per token) over fixed batches."""

from __future__ import annotations

import torch

from atoll.train.device import to_device


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Token-weighted mean loss of ``model`` over ``batches`` (``[B, T]`` token ids each),
    in fp32 on the device the model is on.

    Every batch predicts ``B * (T - 1)`` tokens (the first of each row has no context), so
    the loss is weighted by that count, not averaged per batch.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        batch = to_device(batch, device)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += model(input_ids=batch, labels=batch).loss.item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)
