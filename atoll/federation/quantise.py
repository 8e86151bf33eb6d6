"""Blockwise quantisers: blocks of float values to small integer codes and one scale each.

A block of ``block`` values becomes one float32 scale and ``block`` codes:

* ``int8`` and ``int4``: absmax quantisation to the signed grid -127..127 or -7..7; int4
  stores q + 8, two codes per byte.
* ``int2``: no zero level, four levels -1.5, -0.5, 0.5, 1.5 times absmax / 1.5, four codes
  per byte; this suits what top-k keeps (large entries only) and error feedback.
* ``sign``: one bit per value, its sign, eight per byte, times the block's mean magnitude
  (the scale that makes a block's sign quantisation error smallest). Far from exact on its
  own; with error feedback it is signSGD with memory (Karimireddy et al. 2019).

An all-zero block decodes to zeros in every kind.
"""

from __future__ import annotations

import torch

QMAX = {"int8": 127, "int4": 7}
"""The largest code of the kinds that round to a signed grid."""
WIDTH = {"int4": 4, "int2": 2, "sign": 1}
"""Bits per value of the kinds that pack several values into a byte."""
LEVELS = {"int4": (1.0, 8.0), "int2": (1.0, 1.5), "sign": (2.0, 1.0)}
"""Packed code c stands for ``a * c - b`` times the block's scale: int4 q + 8, int2's four
levels -1.5..1.5, sign's -1 and +1."""
PER_BYTE = {"int8": 1, **{k: 8 // w for k, w in WIDTH.items()}}
"""Codes per byte of every quantised kind (the others are not quantised)."""


def quantise(blocks: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The wire codes (``q``: int8 for int8, packed uint8 bytes otherwise) and the float32
    scales of ``blocks`` (one block per row)."""
    if kind == "int2":  # codes 0..3 for -1.5, -0.5, 0.5, 1.5 scales
        # int2 has no zero level: an all-zero block gets scale 0 so that it decodes to zeros
        scale = blocks.abs().amax(dim=1) / 1.5
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        u = torch.floor(blocks / safe[:, None] + 2).clamp(0, 3).to(torch.uint8)
        return pack_bits(u, 2), scale
    if kind == "sign":  # bit 1 for >= 0
        scale = blocks.abs().mean(dim=1)
        return pack_bits((blocks >= 0).to(torch.uint8), 1), scale
    qmax = QMAX[kind]
    scale = blocks.abs().amax(dim=1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    if kind == "int4":  # each stored as q + 8 in 1..15
        q = pack_bits((q + 8).to(torch.uint8), 4)
    return q, scale


def dequantise(q: torch.Tensor, scale: torch.Tensor, kind: str, n_blocks: int, block: int
               ) -> torch.Tensor:
    """The float32 values, flattened, of the ``n_blocks`` blocks :func:`quantise` encoded."""
    if kind in WIDTH:
        a, b = LEVELS[kind]
        q = unpack_bits(q, WIDTH[kind]).reshape(n_blocks, block).float() * a - b
    # scaled in place: q.float() is always a new tensor here (the wire codes are never
    # float), and one float copy of the largest tensor is what decoding may cost
    return q.float().mul_(scale[:, None]).reshape(-1)


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack unsigned ``width``-bit codes (the last dim a multiple of 8 / width) into bytes,
    8 / width to a byte, the first of them in the highest bits."""
    per = 8 // width
    q = torch.zeros(*codes.shape[:-1], codes.shape[-1] // per, dtype=torch.uint8)
    for j in range(per):
        q |= codes[..., j::per] << (8 - width * (j + 1))
    return q


def unpack_bits(q: torch.Tensor, width: int) -> torch.Tensor:
    """The codes :func:`pack_bits` packed, in order (the last dim 8 / width times longer)."""
    mask = (1 << width) - 1
    parts = [(q >> (8 - width * (j + 1))) & mask for j in range(8 // width)]
    return torch.stack(parts, dim=-1).reshape(*q.shape[:-1], -1)
