"""The coordinator's peak memory, as a formula of the model's tensors and the run's codecs.

A round at the coordinator holds, in float32, the global weights, the outer optimizer's
state and one accumulator, plus the one update being folded in (as it came, encoded) and a
few tensors' worth of temporaries while one tensor of it is decoded and added. Nothing
grows with the number of sites: updates are read one tensor at a time and dropped
(:mod:`atoll.federation.aggregate`), or spilled to disk by the robust rules
(:mod:`atoll.federation.robust`). With ``comm.down.delta`` the sites' copy of the weights
(one more model) and the encoded change sent out are held too. README.md, "Memory at the
coordinator", states the same sum and what bench/coordinator_memory.py measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from atoll.federation.codecs import CodecConfig
from atoll.federation.wire_parts import parts_of
from atoll.train.outer import OuterConfig

TRANSIENT_COPIES = 5
"""float32 copies of the largest tensor alive at once at the worst moment, with the
allocator's slack: while an update is folded in, a decoded tensor and its weighted product;
while the outer step is checked, a copy of the tensor, of its momentum and the Nesterov
temporary. Measured (bench/coordinator_memory.py): about 4 on the 1b and 125m presets."""


def wire_bytes(shapes: Mapping[str, torch.Size], codec: CodecConfig) -> int:
    """Bytes of the wire tensors of an update of ``shapes`` encoded with ``codec``."""
    total = 0
    for shape in shapes.values():
        parts = parts_of(math.prod(shape), codec.kind, codec.block, codec.topk, codec.select)
        total += sum(math.prod(s) * dt.itemsize for dt, s in parts.values())
    return total


@dataclass
class PeakMemory:
    """The coordinator's peak, by what holds it (bytes)."""

    weights: int
    """The global weights, float32."""
    optimizer: int
    """The outer optimizer's state: SGD's momentum (one model) or Adam's two moments."""
    accumulator: int
    """The round's running sum, divided in place into the mean the outer step takes."""
    update: int
    """One update as it arrived, encoded (the engine hands it over whole)."""
    downlink: int
    """With ``comm.down.delta``: the sites' copy plus the encoded change; otherwise the
    encoded weights sent out, unless fp32 (the weights themselves, no copy)."""
    transient: int
    """``TRANSIENT_COPIES`` float32 copies of the largest tensor."""

    @property
    def total(self) -> int:
        """The sum of the parts: the stated peak."""
        return (self.weights + self.optimizer + self.accumulator + self.update +
                self.downlink + self.transient)


def coordinator_peak(shapes: Mapping[str, torch.Size], outer: OuterConfig, up: CodecConfig,
                     down: CodecConfig) -> PeakMemory:
    """The stated peak of a coordinator over a model of ``shapes`` (all tensors synced
    every round: streaming fragments only lower the update and downlink terms)."""
    params = sum(math.prod(s) for s in shapes.values())
    largest = max((math.prod(s) for s in shapes.values()), default=0)
    model = 4 * params
    states = 2 if outer.optimizer == "adam" else (1 if outer.momentum > 0 else 0)
    if down.delta:
        downlink = model + wire_bytes(shapes, down)
    else:
        downlink = 0 if down.lossless else wire_bytes(shapes, down)
    return PeakMemory(weights=model, optimizer=states * model, accumulator=model,
                      update=wire_bytes(shapes, up), downlink=downlink,
                      transient=TRANSIENT_COPIES * 4 * largest)
