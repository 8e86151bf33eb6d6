"""Codecs for what crosses the network: pseudo-gradients up, global weights down.

* ``fp32`` and ``bf16``: the tensor itself, in that dtype.
* ``int8``, ``int4``, ``int2`` and ``sign``: each tensor is flattened and cut into blocks of
  ``block`` values; a block travels as one float32 scale and ``block`` small codes
  (:mod:`atoll.federation.quantise`): 8, 4, 2 or 1 bits a value. How they compare in loss
  per byte: BENCHMARKS.md.
* ``topk`` (optional, any kind): in every chunk of 256 consecutive entries keep only that
  fraction, the largest in magnitude: one byte of index per kept entry (its place in the
  chunk) plus the kept values encoded with ``kind`` (:mod:`atoll.federation.sparse`).
  With ``select = "random"`` the kept places are instead drawn from a seed that both ends
  know (the run and the round): no index travels, and every site of a round keeps the same
  places, so their mean is exactly as sparse as each update and goes down as cheaply.

With error feedback (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD") a site keeps what
the codec dropped and adds it to the next round's delta, so nothing is lost for good: the sum
of what is decoded follows the sum of the true deltas (a test checks this).

Encoded tensors are named ``"<tensor>::<part>"``; :func:`decode` checks every part against
the expected shape and says exactly what is wrong with a corrupt or truncated update.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from atoll.federation.quantise import PER_BYTE, dequantise, quantise
from atoll.federation.sparse import (
    CHUNK,
    as_chunks,
    chunking,
    random_places,
    scatter,
    top_places,
)
from atoll.federation.wire_parts import PartLayout, expect, packed, parts_of, unpack
from atoll.util.errors import WireError
from atoll.util.hashing import seed_of

__all__ = ["CHUNK", "KINDS", "CodecConfig", "Decoded", "ErrorFeedback", "decode", "encode",
           "parse_spec", "round_seed"]

KINDS = ("fp32", "bf16", "int8", "int4", "int2", "sign")


@dataclass
class CodecConfig:
    """How one direction of traffic is encoded."""

    kind: str = "fp32"
    """fp32, bf16, int8, int4, int2 or sign."""
    block: int = 64
    """Values per quantisation block (int8, int4, int2, sign)."""
    topk: float = 0.0
    """Keep only this fraction of the entries of every chunk of 256 (0 = all)."""
    select: str = "top"
    """Which entries ``topk`` keeps: ``top`` (the largest; their places are sent) or
    ``random`` (places drawn from the round's seed, the same at every site; none sent)."""
    error_feedback: bool = True
    """Uplink: carry what the codec dropped into the next round."""
    feedback_decay: float = 1.0
    """Uplink: the carried residual is scaled by this before it is added to the next delta
    (1 = plain error feedback; below 1 what stays unsent for long fades, which SparseLoCo
    found to act like outer momentum on sparse updates)."""
    delta: bool = False
    """Downlink: send each site the change since the weights it already holds, not the
    weights; what the codec drops stays with the coordinator and goes out next round."""

    def check(self) -> None:
        """Refuse a codec that cannot encode (the config loader names the key)."""
        if self.kind not in KINDS:
            raise ValueError(f"codec kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        per_byte = PER_BYTE.get(self.kind, 2)
        if self.block < 2 or self.block % max(2, per_byte):
            raise ValueError(f"codec block must be a multiple of {max(2, per_byte)} for "
                             f"{self.kind}, got {self.block}")
        if not 0 <= self.topk < 1:
            raise ValueError(f"codec topk must be a fraction in [0, 1), got {self.topk}")
        if self.select not in ("top", "random"):
            raise ValueError(f"codec select must be 'top' or 'random', got {self.select!r}")
        if not 0 < self.feedback_decay <= 1:
            raise ValueError(f"codec feedback_decay must be in (0, 1], got "
                             f"{self.feedback_decay}")

    @property
    def spec(self) -> str:
        """A short name, e.g. ``int4/64+top0.1`` or ``int2/64+rand0.05``; :func:`parse_spec`
        reads it back."""
        s = self.kind + (f"/{self.block}" if self.kind in PER_BYTE else "")
        tag = "top" if self.select == "top" else "rand"
        return s + (f"+{tag}{self.topk:g}" if self.topk else "")

    @property
    def lossless(self) -> bool:
        """Whether decoding gives back exactly what was encoded (fp32, every entry)."""
        return self.kind == "fp32" and not self.topk


def parse_spec(spec: str) -> CodecConfig:
    """The codec named by :attr:`CodecConfig.spec`."""
    try:
        select = "random" if "+rand" in spec else "top"
        body, _, top = spec.partition("+rand" if select == "random" else "+top")
        kind, _, block = body.partition("/")
        cfg = CodecConfig(kind=kind, block=int(block) if block else 64,
                          topk=float(top) if top else 0.0, select=select)
        cfg.check()
    except ValueError:
        raise WireError(f"unknown codec {spec!r}") from None
    return cfg


def round_seed(run_id: str, round_: int) -> int:
    """The seed of round ``round_``'s random places (``select = "random"``)."""
    return seed_of(run_id, round_, hex_digits=15)


def encode(named: Mapping[str, torch.Tensor], cfg: CodecConfig, seed: int = 0,
           shapes: Mapping[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """Encode every tensor of ``named``; the result is what goes on the wire. ``seed``
    draws the places ``select = "random"`` keeps (:func:`round_seed`).

    fp32 and bf16 keep one wire tensor per model tensor (no copy for big models). The other
    codecs pack each part of every tensor into one wire tensor, in name order (``::q``,
    ``::scale``, ``::idx``, ``::val``): the small parts of a few hundred tensors would
    otherwise cost more in safetensors header than in payload. Each tensor is read once and
    encoded straight into its place, so with ``shapes`` given ``named`` may be a mapping
    that makes each tensor when read: the whole is never held besides what goes out."""
    if not _packed(cfg):
        parts: dict[str, torch.Tensor] = {}
        for name, t in named.items():
            parts.update(_encode_tensor(name, t, cfg, seed))
        return parts
    shapes = shapes if shapes is not None else {n: t.shape for n, t in named.items()}
    layout = {n: _parts_of(math.prod(shapes[n]), cfg) for n in sorted(shapes)}
    out = {p: torch.empty(sum(math.prod(layout[n][p][1]) for n in layout), dtype=dt)
           for p, dt in _layout(cfg).items()}
    at = dict.fromkeys(out, 0)
    for name in layout:
        for key, t in _encode_tensor(name, named[name], cfg, seed).items():
            part = key.rpartition("::")[2]
            out[part][at[part] : at[part] + t.numel()] = t.reshape(-1)
            at[part] += t.numel()
    return {f"::{p}": t for p, t in out.items()}


def _encode_tensor(name: str, t: torch.Tensor, cfg: CodecConfig, seed: int
                   ) -> dict[str, torch.Tensor]:
    """The wire parts of one tensor (``"<name>::<part>"``)."""
    parts: dict[str, torch.Tensor] = {}
    flat = t.detach().float().reshape(-1)
    if cfg.topk:
        chunk, k = chunking(cfg.topk, flat.numel())
        chunks = as_chunks(flat, chunk)
        if cfg.select == "random":
            idx = random_places(name, chunks.shape[0], chunk, k, seed)
        else:
            idx = top_places(chunks, k)
            parts[f"{name}::idx"] = idx.to(torch.uint8)
        flat = chunks.gather(1, idx).reshape(-1)
    parts.update(_encode_values(name, flat, t.shape if not cfg.topk else None, cfg))
    return parts


def _encode_values(name: str, flat: torch.Tensor, shape: torch.Size | None, cfg: CodecConfig
                   ) -> dict[str, torch.Tensor]:
    if cfg.kind in ("fp32", "bf16"):
        v = flat.to(torch.float32 if cfg.kind == "fp32" else torch.bfloat16)
        return {f"{name}::val": v if shape is None else v.reshape(shape)}
    n_blocks = math.ceil(flat.numel() / cfg.block)
    blocks = torch.zeros(n_blocks * cfg.block)
    blocks[: flat.numel()] = flat
    q, scale = quantise(blocks.reshape(n_blocks, cfg.block), cfg.kind)
    return {f"{name}::q": q, f"{name}::scale": scale}


def decode(encoded: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
           cfg: CodecConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors of the given ``shapes`` from :func:`encode`'s output (``seed``: the
    one it was encoded with, for ``select = "random"``); all at once, see :class:`Decoded`
    for one at a time.

    Raises :class:`~atoll.util.errors.WireError` naming the tensor (or the packed part) and the
    problem if anything is missing, extra, of the wrong size or dtype."""
    return dict(Decoded(encoded, shapes, cfg, seed).items())


class Decoded(Mapping[str, torch.Tensor]):
    """An encoded update read as its float32 tensors, one at a time.

    Made, it has checked that every wire part is there with its dtype and size (raising
    :class:`~atoll.util.errors.WireError` as :func:`decode` does); each tensor is decoded
    when read and not kept, so whoever reads them one after another holds one decoded
    tensor at a time besides the encoded update. Reading a tensor can still raise
    WireError for what only its values show (a top-k index out of range)."""

    def __init__(self, encoded: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                 cfg: CodecConfig, seed: int = 0) -> None:
        self.shapes = dict(shapes)
        self.cfg = cfg
        self.seed = seed
        layout = {n: _parts_of(math.prod(self.shapes[n]), cfg) for n in sorted(self.shapes)}
        self.parts = unpack(encoded, layout) if _packed(cfg) else encoded
        for name, shape in self.shapes.items():
            for part, (dtype, part_shape) in layout[name].items():
                expect(self.parts, f"{name}::{part}", f"tensor {name!r}: part '{part}'", dtype,
                       part_shape if part != "val" or cfg.topk else tuple(shape))
        extra = sorted(set(self.parts) - {f"{n}::{p}" for n in layout for p in layout[n]})
        if extra:
            raise WireError(f"unexpected tensor {extra[0]!r}")

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, cfg = self.shapes[name], self.cfg
        numel = math.prod(shape)
        if not cfg.topk:
            return _decode_values(self.parts, name, numel, shape, cfg)
        chunk, k = chunking(cfg.topk, numel)
        if cfg.select == "random":
            idx = random_places(name, -(-numel // chunk), chunk, k, self.seed)
        else:
            idx = self.parts[f"{name}::idx"].long()
        if idx.numel() and idx.max() >= chunk:
            raise WireError(f"tensor {name!r}: top-k index {idx.max().item()} out of range "
                            f"for chunks of {chunk}")
        values = _decode_values(self.parts, name, idx.numel(), None, cfg)
        return scatter(idx, values, chunk, numel).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _packed(cfg: CodecConfig) -> bool:
    return packed(cfg.kind, cfg.topk)


def _parts_of(numel: int, cfg: CodecConfig) -> PartLayout:
    return parts_of(numel, cfg.kind, cfg.block, cfg.topk, cfg.select)


def _layout(cfg: CodecConfig) -> dict[str, torch.dtype]:
    """The packed parts of a codec and their dtypes."""
    return {p: dt for p, (dt, _) in _parts_of(1, cfg).items()}


def _decode_values(encoded: Mapping[str, torch.Tensor], name: str, numel: int,
                   shape: torch.Size | None, cfg: CodecConfig) -> torch.Tensor:
    if cfg.kind in ("fp32", "bf16"):
        return encoded[f"{name}::val"].float().reshape(-1 if shape is None else shape)
    n_blocks = math.ceil(numel / cfg.block)
    values = dequantise(encoded[f"{name}::q"], encoded[f"{name}::scale"], cfg.kind, n_blocks,
                        cfg.block)[:numel]
    return values if shape is None else values.reshape(shape)


class ErrorFeedback:
    """The residual a site keeps: ``send = delta + decay * residual``,
    ``residual = send - decoded``."""

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def encode(self, delta: dict[str, torch.Tensor], cfg: CodecConfig, decay: float = 1.0,
               seed: int = 0) -> dict[str, torch.Tensor]:
        """The wire form of ``delta`` plus the decayed residual; what the codec dropped of
        it becomes the next residual."""
        send = {k: v + decay * self.residual[k] if k in self.residual else v
                for k, v in delta.items()}
        encoded = encode(send, cfg, seed)
        decoded = decode(encoded, {k: v.shape for k, v in send.items()}, cfg, seed)
        self.residual = {k: send[k] - decoded[k] for k in send}
        return encoded
