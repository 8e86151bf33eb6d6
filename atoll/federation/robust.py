"""Aggregation rules that a few hostile sites cannot steer: median, trimmed mean, centered
clipping.

The weighted mean (:mod:`atoll.federation.aggregate`) follows any single update as far as it
likes: one site sending its pseudo-gradient flipped and scaled moves the model wherever it
wants. These rules bound what a minority can do. They need every update of the round at
once, so each arriving update is spilled to a file (raw float32, written as it is decoded)
and the rule reads the files back one tensor at a time: memory holds the result (one model)
and a few tensors' worth however many sites there are, and the disk holds one model per
update until the round closes.

Weights: the median and trimmed mean count every update alike (a site cannot buy influence
by claiming more tokens); centered clipping weights by tokens like the mean.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RULES = ("mean", "median", "trimmed_mean", "centered_clip")


@dataclass
class AggregationConfig:
    """How the coordinator combines the round's pseudo-gradients."""

    rule: str = "mean"
    """mean (token-weighted), median (coordinate-wise), trimmed_mean, centered_clip."""
    trim: float = 0.2
    """trimmed_mean: drop this fraction of the values at each end, per coordinate."""
    clip_iterations: int = 3
    """centered_clip: refinement passes (Karimireddy et al. 2021 use 1-3)."""

    def check(self) -> None:
        """Refuse an unknown rule, a trim fraction outside [0, 0.5), no clipping pass."""
        if self.rule not in RULES:
            raise ValueError(f"aggregation.rule must be one of {', '.join(RULES)}, "
                             f"got {self.rule!r}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"aggregation.trim must be in [0, 0.5), got {self.trim}")
        if self.clip_iterations < 1:
            raise ValueError("aggregation.clip_iterations must be at least 1")


class SpilledUpdates:
    """The round's updates on disk, readable tensor by tensor.

    Each update is one file of raw float32 values, its tensors one after another in the
    order of the first update's names, written as they are read (an update that decodes as
    it is read is never whole in memory) and read back one tensor at a time."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="atoll-round-"))
        self.files: list[Path] = []
        self.weights: list[float] = []
        self.names: list[str] = []
        self._places: dict[str, tuple[int, torch.Size]] = {}  # name -> (byte offset, shape)

    @torch.no_grad()
    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Write one update to disk (float32) with its weight."""
        path = self.dir / f"{len(self.files):05d}.f32"
        first = not self.files
        if not first and sorted(delta) != sorted(self.names):
            raise ValueError("a spilled update holds other tensors than the round's first")
        with open(path, "wb") as f:
            for name in (delta if first else self.names):
                t = delta[name].detach().float().contiguous()
                if first:
                    self.names.append(name)
                    self._places[name] = (f.tell(), t.shape)
                elif t.shape != self._places[name][1]:
                    raise ValueError(f"spilled tensor {name!r} has shape {tuple(t.shape)}")
                f.write(memoryview(t.reshape(-1).numpy()))
        self.files.append(path)
        self.weights.append(weight)

    def tensor(self, name: str) -> torch.Tensor:
        """``[n_updates, *shape]``: one tensor of every update."""
        return torch.stack(list(self.each(name)))

    def each(self, name: str) -> Iterator[torch.Tensor]:
        """One tensor of every update, read one at a time."""
        offset, shape = self._places[name]
        for path in self.files:
            values = np.fromfile(path, dtype=np.float32, count=shape.numel(), offset=offset)
            yield torch.from_numpy(values).reshape(shape)

    def close(self) -> None:
        """Delete the spilled updates."""
        shutil.rmtree(self.dir, ignore_errors=True)


class RobustAggregate:
    """Collects a round's updates (:meth:`add`) and combines them by ``cfg.rule``.

    Memory of :meth:`result`: the result (one model, which the outer step then uses as its
    gradient) plus, for the median and trimmed mean, a few times ``n_updates`` copies of
    the tensor being combined (read, stacked, sorted: about 2x for the median, 5x for the
    trimmed mean, whose sort keeps int64 indices); centered clipping holds, besides the
    result, the correction of one tensor and one tensor of one update at a time, reading the
    spilled updates ``2 * clip_iterations`` times. :meth:`add` writes an update as it reads
    it: nothing of it stays in memory."""

    def __init__(self, cfg: AggregationConfig) -> None:
        self.cfg = cfg
        self.spill = SpilledUpdates()

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Keep one accepted update (on disk) until the round closes; ``weight`` counts in
        centered clipping only (the median and trimmed mean count every update alike)."""
        self.spill.add(delta, weight)

    def result(self) -> dict[str, torch.Tensor] | None:
        """The aggregate by the configured rule, tensor by tensor, or None when no update
        came; the spilled updates are deleted either way."""
        try:
            if not self.spill.files:
                return None
            if self.cfg.rule == "centered_clip":
                return self._centered_clip()
            out = {}
            for name in self.spill.names:
                stacked = self.spill.tensor(name)
                out[name] = (stacked.median(dim=0).values if self.cfg.rule == "median"
                             else trimmed_mean(stacked, self.cfg.trim))
            return out
        finally:
            self.spill.close()

    def _centered_clip(self) -> dict[str, torch.Tensor]:
        """Centered clipping (Karimireddy, He, Jaggi 2021): from a robust start ``v`` (the
        coordinate-wise median), ``v <- v + sum_i w_i clip(delta_i - v, tau) / sum_i w_i``,
        with ``tau`` the median distance ``|delta_i - v|`` of this pass: updates far from
        the bulk are pulled in to the typical distance, the bulk is left as it is."""
        s = self.spill
        v = {name: s.tensor(name).median(dim=0).values for name in s.names}
        total = sum(s.weights)
        for _ in range(self.cfg.clip_iterations):
            dist2 = torch.zeros(len(s.files), dtype=torch.float64)
            for name in s.names:
                for i, d in enumerate(s.each(name)):
                    dist2[i] += (d - v[name]).double().pow(2).sum()
            dist = dist2.sqrt()
            tau = float(dist.median())
            scale = [min(1.0, tau / float(x)) if x > 0 else 1.0 for x in dist]
            for name in s.names:
                step = torch.zeros_like(v[name])
                for i, d in enumerate(s.each(name)):
                    step.add_(d - v[name], alpha=s.weights[i] * scale[i] / total)
                v[name] += step
        return v


def trimmed_mean(stacked: torch.Tensor, trim: float) -> torch.Tensor:
    """Per coordinate: drop the ``trim`` fraction of the smallest and of the largest values
    (at least one each when there are three or more updates), average the rest."""
    n = stacked.shape[0]
    k = int(trim * n)
    if trim > 0 and n >= 3:
        k = max(k, 1)
    k = min(k, (n - 1) // 2)
    if k == 0:
        return stacked.mean(dim=0)
    ordered = stacked.sort(dim=0).values
    return ordered[k : n - k].mean(dim=0)
