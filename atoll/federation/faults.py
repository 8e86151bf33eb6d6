"""Site misbehaviour that can be switched on for tests, drills and ``bench/attacks.py``: how
the coordinator copes is part of what atoll promises.

What a hostile or broken site does to its own pseudo-gradient (the site applies it before it
encodes and signs the update, so the coordinator sees a well-formed, signed message, as it
would from a real attacker):

* ``sign_flip``: the update negated and scaled x10 (drags the model backwards);
* ``scale100``: the update scaled x100;
* ``noise``: Gaussian noise with the norm of the honest update;
* ``zero``: all zeros (a free rider that trains nothing);
* ``replay``: the first update it ever sent, sent again (a free rider);
* ``nan``: NaN values;
* ``shape``: one tensor one element short.

What a broken site or network does to the message (applied after encoding):

* ``stale``: the update claims to belong to the previous round;
* ``garbage``: the payload bytes are random (undecodable).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from atoll.federation.checks import global_norm
from atoll.federation.fault_kinds import DELTA_FAULTS, WIRE_FAULTS, check_fault
from atoll.federation.protocol import SiteUpdate


@torch.no_grad()
def corrupt_delta(delta: dict[str, torch.Tensor], fault: str, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """The pseudo-gradient a site with ``fault`` sends instead of ``delta`` (``replay`` is
    handled by the site, which remembers what it sent)."""
    if fault == "sign_flip":
        return {k: -10.0 * v for k, v in delta.items()}
    if fault == "scale100":
        return {k: 100.0 * v for k, v in delta.items()}
    if fault == "noise":
        g = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(v.shape, generator=g) for k, v in delta.items()}
        scale = global_norm(delta) / global_norm(noise)
        return {k: v * scale for k, v in noise.items()}
    if fault == "zero":
        return {k: torch.zeros_like(v) for k, v in delta.items()}
    if fault == "nan":
        return {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
    if fault == "shape":
        first = next(iter(delta))
        return {**delta, first: delta[first].reshape(-1)[:-1]}
    return delta


def apply_fault(update: SiteUpdate, blob: bytes, fault: str) -> tuple[SiteUpdate, bytes]:
    """The (update, payload bytes) a site whose messages suffer ``fault`` sends."""
    check_fault(fault)
    if fault == "stale":
        return dataclasses.replace(update, round=update.round - 1), blob
    if fault == "garbage":
        return update, os.urandom(len(blob))
    return update, blob


def message_fault(fault: str) -> str:
    """The part of ``fault`` that is applied to messages (empty for delta faults)."""
    return fault if fault in WIRE_FAULTS else ""


def delta_fault(fault: str) -> str:
    return fault if fault in DELTA_FAULTS else ""

