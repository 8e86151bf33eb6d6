"""The wire layout of an encoded update: which parts each tensor travels as, how the packed
codecs lay those parts end to end, and the checks a received part must pass.

Every part is checked for presence, dtype and size before a single value is decoded, so a
corrupt or truncated update is refused with the tensor and the problem named.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from atoll.federation.quantise import PER_BYTE
from atoll.federation.sparse import chunking
from atoll.util.errors import WireError

PartLayout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def packed(kind: str, topk: float) -> bool:
    """Whether a codec packs each part of every tensor into one wire tensor (all but plain
    fp32 and bf16, whose wire tensors are the tensors themselves)."""
    return not (kind in ("fp32", "bf16") and not topk)


def parts_of(numel: int, kind: str, block: int, topk: float, select: str) -> PartLayout:
    """The wire parts of one tensor of ``numel`` entries: dtype and shape of each."""
    parts: PartLayout = {}
    values = numel
    if topk:
        chunk, k = chunking(topk, numel)
        values = -(-numel // chunk) * k
        if select == "top":
            parts["idx"] = (torch.uint8, (-(-numel // chunk), k))
    if kind in ("fp32", "bf16"):
        parts["val"] = (torch.float32 if kind == "fp32" else torch.bfloat16, (values,))
    else:
        n_blocks = math.ceil(values / block)
        parts["q"] = (torch.int8 if kind == "int8" else torch.uint8,
                      (n_blocks, block // PER_BYTE[kind]))
        parts["scale"] = (torch.float32, (n_blocks,))
    return parts


def unpack(encoded: Mapping[str, torch.Tensor], layout: dict[str, PartLayout]
           ) -> dict[str, torch.Tensor]:
    """Cut the packed parts back into per-tensor parts (views, no copy), checking their
    sizes first; ``layout``: each tensor's parts, in the packed (name) order."""
    out: dict[str, torch.Tensor] = {}
    kinds = {p: dt for parts in layout.values() for p, (dt, _) in parts.items()}
    for part, dtype in kinds.items():
        sizes = [math.prod(layout[n][part][1]) for n in layout]
        t = expect(encoded, f"::{part}", f"packed part '{part}'", dtype, (sum(sizes),))
        for n, piece in zip(layout, t.split(sizes), strict=True):
            out[f"{n}::{part}"] = piece.reshape(layout[n][part][1])
    extra = sorted(set(encoded) - {f"::{p}" for p in kinds})
    if extra:
        raise WireError(f"unexpected tensor {extra[0]!r}")
    return out


def expect(encoded: Mapping[str, torch.Tensor], key: str, what: str, dtype: torch.dtype,
           shape: tuple[int, ...]) -> torch.Tensor:
    """``encoded[key]``, once it is there with this dtype and shape; ``what`` names it in
    the error otherwise."""
    if key not in encoded:
        raise WireError(f"{what} is missing")
    t = encoded[key]
    if t.dtype != dtype:
        raise WireError(f"{what} is {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise WireError(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                        f"(truncated or from another model?)")
    return t
