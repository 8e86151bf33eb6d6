"""Validation loss: mean next-token cross-entropy (nats per token) over fixed batches."""

from __future__ import annotations

from pathlib import Path

import torch

from atoll.consent.pool import consent_filter
from atoll.data.reader import TokenDataset, validation_batches
from atoll.train.device import to_device


def held_out_batches(data: str | Path, seq_len: int, batch_size: int, max_batches: int,
                     purpose: str) -> list[torch.Tensor]:
    """The validation batches of one prepared data folder (none when it is too small to
    hold out rows). A pool's held-out rows are its contributors' data too: consent applies,
    read afresh on every call, so a revoked contribution leaves the next evaluation."""
    ds = TokenDataset(data, "val", seq_len)
    if len(ds) == 0:
        return []
    return validation_batches(ds, batch_size, max_batches, consent_filter(data, purpose))


@torch.no_grad()
def loss_and_tokens(model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[float, int]:
    """Token-weighted mean loss of ``model`` over ``batches`` (``[B, T]`` token ids each),
    in fp32 on the device the model is on, and the number of tokens it predicted.

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
    return total / max(count, 1), count


def validation_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """:func:`loss_and_tokens` without the count."""
    return loss_and_tokens(model, batches)[0]
