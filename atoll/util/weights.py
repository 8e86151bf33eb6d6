"""Copying named weights into a module's parameters, the one way every layer does it."""

from __future__ import annotations

import torch


@torch.no_grad()
def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (a subset of the module's parameter names) into ``module`` in place,
    so optimizers holding its parameters keep them."""
    params = dict(module.named_parameters())
    for name, w in weights.items():
        params[name].copy_(w)
