"""Where an update is checked before it may touch the global weights.

A rejected update is reported with its reason and left out of the round; the others go on.
"""

from __future__ import annotations

import torch

from atoll.federation.protocol import SiteUpdate


def check_header(update: SiteUpdate, run_id: str, round_: int, expected_sites: set[str],
                 codec: str) -> str | None:
    """The reason to reject ``update`` before even decoding it, or None."""
    if update.run_id != run_id:
        return f"belongs to run {update.run_id!r}, not {run_id!r}"
    if update.round != round_:
        return f"stale: for round {update.round}, the open round is {round_}"
    if update.site not in expected_sites:
        return f"site {update.site!r} was not asked to train in round {round_}"
    if update.tokens <= 0 or update.steps <= 0:
        return f"reports {update.tokens} tokens in {update.steps} steps"
    if update.codec != codec:
        return f"encoded with {update.codec!r}, the federation uses {codec!r}"
    return None


def check_delta(delta: dict[str, torch.Tensor],
                shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> str | None:
    """The reason to reject a decoded pseudo-gradient, or None if it may be aggregated."""
    missing = sorted(set(shapes) - set(delta))
    if missing:
        return f"tensor {missing[0]!r} is missing"
    extra = sorted(set(delta) - set(shapes))
    if extra:
        return f"unexpected tensor {extra[0]!r}"
    for name, (shape, dtype) in shapes.items():
        t = delta[name]
        if t.shape != shape:
            return f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        if t.dtype != dtype:
            return f"tensor {name!r} has dtype {t.dtype}, expected {dtype}"
        if not torch.isfinite(t).all():
            return f"tensor {name!r} holds NaN or infinite values"
    return None
