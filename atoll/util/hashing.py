"""SHA-256 as the project's one source of derived seeds and of tensor fingerprints.

Every seed that must be the same on every machine (a site's data order, a round's random
codec places, a baseline reader's order) is derived here from readable parts, so two
places that mean the same seed cannot drift apart.
"""

from __future__ import annotations

import hashlib

import torch


def seed_of(*parts: object, hex_digits: int = 8) -> int:
    """A seed derived from ``parts`` (joined by ``:``): the first ``hex_digits`` hex digits
    of their SHA-256, as an integer (8 digits fit numpy's seeds, 15 fit torch's)."""
    text = ":".join(str(p) for p in parts)
    return int(hashlib.sha256(text.encode()).hexdigest()[:hex_digits], 16)


def tensors_digest(named: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # the tensor's own bytes, not a copy of them (an update of a large model is
        # gigabytes)
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
