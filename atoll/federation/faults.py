"""Site misbehaviour that can be switched on for tests and drills (``fault`` in a site's
node config): how the coordinator copes is part of what atoll promises.

* ``stale``: the update claims to belong to the previous round;
* ``garbage``: the payload bytes are random (undecodable);
* ``nan``: the pseudo-gradient holds NaN values.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from atoll.federation.protocol import SiteUpdate, tensor_bytes

FAULTS = ("", "stale", "garbage", "nan")


def apply_fault(update: SiteUpdate, blob: bytes, fault: str) -> tuple[SiteUpdate, bytes]:
    """The (update, payload bytes) a site with ``fault`` sends instead of the honest ones."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r} (one of {', '.join(f for f in FAULTS if f)})")
    if fault == "stale":
        return dataclasses.replace(update, round=update.round - 1), blob
    if fault == "garbage":
        return update, os.urandom(len(blob))
    if fault == "nan":
        delta = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                 for k, v in update.delta.items()}
        return dataclasses.replace(update, delta=delta), tensor_bytes(delta)
    return update, blob
