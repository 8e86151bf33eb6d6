"""Top-k by chunks: which entries of a tensor a sparse update keeps, and putting them back.

In every chunk of :data:`CHUNK` consecutive entries a fraction is kept: the largest in
magnitude (their places travel, one byte each: a place within a chunk fits in a byte) or
places drawn from a seed both ends know (nothing travels). Chunks bound the index to a byte
and spread what is kept over the whole tensor (SparseLoCo, Sarfi et al. 2025, chunks
likewise).
"""

from __future__ import annotations

import math

import torch

from atoll.util.hashing import seed_of

CHUNK = 256
"""Entries per top-k chunk: an index within a chunk fits in one byte."""


def chunking(fraction: float, numel: int) -> tuple[int, int]:
    """Top-k's chunk length for a tensor of ``numel`` entries (a smaller tensor is one
    chunk) and how many entries it keeps per chunk: at least one."""
    chunk = max(1, min(CHUNK, numel))
    return chunk, min(chunk, max(1, math.ceil(fraction * chunk)))


def as_chunks(flat: torch.Tensor, chunk: int) -> torch.Tensor:
    """``flat`` zero-padded to whole chunks, one chunk per row."""
    chunks = torch.zeros(-(-flat.numel() // chunk) * chunk)
    chunks[: flat.numel()] = flat
    return chunks.reshape(-1, chunk)


def top_places(chunks: torch.Tensor, k: int) -> torch.Tensor:
    """The places of the ``k`` largest-magnitude entries of every chunk, in ascending order."""
    return chunks.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def random_places(name: str, n_chunks: int, chunk: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct places in each of ``n_chunks`` chunks, drawn from ``seed`` and the
    tensor's name: evenly spaced from a random start, so over rounds every place comes up."""
    g = torch.Generator().manual_seed(seed_of(seed, name, hex_digits=15))
    start = torch.randint(0, chunk, (n_chunks, 1), generator=g)
    spaced = (torch.arange(k) * chunk) // k
    return ((start + spaced) % chunk).sort(dim=1).values


def scatter(idx: torch.Tensor, values: torch.Tensor, chunk: int, numel: int) -> torch.Tensor:
    """The flat tensor of ``numel`` entries that holds ``values`` at the places ``idx``
    (one row of places per chunk) and zeros elsewhere."""
    dense = torch.zeros(idx.shape[0], chunk)
    dense.scatter_(1, idx, values.reshape(idx.shape))
    return dense.reshape(-1)[:numel]
