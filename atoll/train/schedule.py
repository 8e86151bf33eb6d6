"""Learning-rate schedule on a global step clock: linear warm-up, then cosine to a floor.

The clock counts inner steps since the start of the run, not of the round, so the schedule
runs on across rounds, restarts and late joiners (a site told "you are at step s" trains at
the learning rate the run is at).
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, peak: float, warmup: int, total: int, floor_ratio: float) -> float:
    """The learning rate for (0-based) ``step``.

    Warm-up rises linearly to ``peak`` over ``warmup`` steps; then a half cosine falls to
    ``peak * floor_ratio`` at ``total`` steps, and stays there beyond.
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = peak * floor_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
