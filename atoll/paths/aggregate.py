"""Each module's outer step averages the updates of the paths that run through it.

A site's update is the pseudo-gradient of one path; the coordinator names its tensors by
their grid keys (``<module>/<parameter>``) before it checks them. Split by module, each part
goes into that module's own token-weighted mean, so a module shared by paths A and B receives
``(t_A * delta_A + t_B * delta_B) / (t_A + t_B)`` and the shared embeddings and head average
every update of the round. A 1 x 1 grid is the dense model: one mean over every update, the
same arithmetic in the same order, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from atoll.paths.grid import PathsConfig
from atoll.util.views import Subset


class Mean(Protocol):
    """What a module's accumulator does (the federation's ``WeightedMean``, or a robust
    rule): fold updates in with a weight, then give their combination."""

    total_weight: float

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold in one update with its weight."""

    def result(self) -> dict[str, torch.Tensor] | None:
        """The combination of what was added (None: nothing was)."""


class ModuleMean:
    """One accumulator per module an update touched (the grid's size at most), made by
    ``make_mean``: the federation's rule, applied module by module."""

    def __init__(self, cfg: PathsConfig, make_mean: Callable[[], Mean]) -> None:
        self.cfg = cfg
        self.make_mean = make_mean
        self._means: dict[str, Mean] = {}

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold in one path's pseudo-gradient (keyed by grid keys) with its weight (its
        tokens); its tensors are read one at a time, as they are for a dense update."""
        by_module: dict[str, list[str]] = {}
        for key in delta:
            by_module.setdefault(key.partition("/")[0], []).append(key)
        for module, keys in by_module.items():
            if module not in self._means:
                self._means[module] = self.make_mean()
            self._means[module].add(Subset(delta, keys), weight)

    def weight(self, module: str) -> float:
        """The summed weight of the updates that touched ``module`` (0: none did)."""
        mean = self._means.get(module)
        return mean.total_weight if mean is not None else 0.0

    def result(self) -> dict[str, torch.Tensor] | None:
        """Every touched module's mean, keyed as the grid's weights; None when nothing was
        added. Modules no update touched are absent: the outer step leaves them alone."""
        if not self._means:
            return None
        out: dict[str, torch.Tensor] = {}
        for module in self.cfg.modules():
            if module in self._means:
                out.update(self._means[module].result() or {})
        return out

