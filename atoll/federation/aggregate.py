"""Streaming aggregation of pseudo-gradients: the coordinator holds one model of accumulator.

Updates are folded in as they arrive and then dropped, so memory does not grow with the
number of sites (Photon's server does the same). The weighted mean uses token counts as
weights: a site that trained on twice the tokens counts twice.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from atoll.federation.privacy import PrivacyConfig, PrivateMean
from atoll.federation.robust import AggregationConfig, RobustAggregate
from atoll.paths.aggregate import ModuleMean
from atoll.paths.grid import PathsConfig


class WeightedMean:
    """sum_i w_i * delta_i / sum_i w_i, accumulated one update at a time.

    Memory: one float32 tensor per model tensor (one model), whatever the number of sites,
    plus one product of the tensor being added; an update is read one tensor at a time (it
    may decode each as it is read) and the mean is divided in place.
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] | None = None
        self._divided = False
        self.total_weight = 0.0
        self.count = 0

    @torch.no_grad()
    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add one accepted update with its aggregation ``weight`` (positive) to the sum."""
        if weight <= 0:
            raise ValueError(f"aggregation weight must be positive, got {weight}")
        if self._divided:
            raise RuntimeError("add() after result(): the sum was divided in place")
        if self._sum is None:
            self._sum = {}
        for k, v in delta.items():
            if k not in self._sum:
                self._sum[k] = torch.zeros_like(v, dtype=torch.float32)
            # the product first, then the sum (not a fused multiply-add): a + b == b + a, so
            # two updates give the same mean in whichever order they arrive
            self._sum[k].add_(v.float() * weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor] | None:
        """The weighted mean, or None when nothing was added. The sum is divided in place
        (no second model): the mean is the accumulator itself, and the same on every call."""
        if self._sum is None:
            return None
        if not self._divided:
            for v in self._sum.values():
                v.div_(self.total_weight)
            self._divided = True
        return self._sum


Aggregate = WeightedMean | RobustAggregate | PrivateMean | ModuleMean


def round_aggregate(privacy: PrivacyConfig, rule: AggregationConfig, planned: int,
                    round_: int, paths: PathsConfig | None = None) -> Aggregate:
    """Where a round's updates are combined: the token-weighted mean, a robust rule, or
    (with differential privacy) a clipped, noised sum; with a grid of paths, the mean or the
    robust rule module by module."""
    if privacy.enabled:
        return PrivateMean(privacy, planned, round_)

    def one() -> WeightedMean | RobustAggregate:
        return WeightedMean() if rule.rule == "mean" else RobustAggregate(rule)

    return one() if paths is None else ModuleMean(paths, one)
