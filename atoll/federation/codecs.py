"""Codecs for what crosses the network: pseudo-gradients up, global weights down.

* ``fp32`` and ``bf16``: the tensor itself, in that dtype.
* ``int8`` and ``int4``: blockwise absmax quantisation. Each tensor is flattened and cut into
  blocks of ``block`` values; a block is stored as one float32 scale (its largest magnitude
  over 127, or over 7) and ``block`` signed integers (int4: two per byte).
* ``topk`` (optional, any kind): keep only that fraction of each tensor's entries, the largest
  in magnitude, as int32 indices plus values encoded with ``kind``.

With error feedback (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD") a site keeps what
the codec dropped and adds it to the next round's delta, so nothing is lost for good: the sum
of what is decoded follows the sum of the true deltas (a test checks this).

Encoded tensors are named ``"<tensor>::<part>"``; :func:`decode` checks every part against
the expected shape and says exactly what is wrong with a corrupt or truncated update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atoll.errors import WireError

KINDS = ("fp32", "bf16", "int8", "int4")
_QMAX = {"int8": 127, "int4": 7}


@dataclass
class CodecConfig:
    """How one direction of traffic is encoded."""

    kind: str = "fp32"
    """fp32, bf16, int8 or int4."""
    block: int = 64
    """Values per quantisation block (int8, int4)."""
    topk: float = 0.0
    """Keep only this fraction of each tensor's entries, by magnitude (0 = all)."""
    error_feedback: bool = True
    """Uplink: carry what the codec dropped into the next round."""
    delta: bool = False
    """Downlink: send each site the change since the weights it already holds, not the
    weights; what the codec drops stays with the coordinator and goes out next round."""

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"codec kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.block < 2 or self.block % 2:
            raise ValueError(f"codec block must be an even number >= 2, got {self.block}")
        if not 0 <= self.topk < 1:
            raise ValueError(f"codec topk must be a fraction in [0, 1), got {self.topk}")

    @property
    def spec(self) -> str:
        """A short name, e.g. ``int4/64+top0.1``; :func:`parse_spec` reads it back."""
        s = self.kind + (f"/{self.block}" if self.kind in _QMAX else "")
        return s + (f"+top{self.topk:g}" if self.topk else "")

    @property
    def lossless(self) -> bool:
        return self.kind == "fp32" and not self.topk


def parse_spec(spec: str) -> CodecConfig:
    """The codec named by :attr:`CodecConfig.spec`."""
    try:
        body, _, top = spec.partition("+top")
        kind, _, block = body.partition("/")
        cfg = CodecConfig(kind=kind, block=int(block) if block else 64,
                          topk=float(top) if top else 0.0)
        cfg.check()
    except ValueError:
        raise WireError(f"unknown codec {spec!r}") from None
    return cfg


def encode(named: dict[str, torch.Tensor], cfg: CodecConfig) -> dict[str, torch.Tensor]:
    """Encode every tensor of ``named``; the result is what goes on the wire."""
    out: dict[str, torch.Tensor] = {}
    for name, t in named.items():
        flat = t.detach().float().reshape(-1)
        if cfg.topk:
            k = _kept(cfg.topk, flat.numel())
            idx = flat.abs().topk(k, sorted=False).indices.sort().values
            out[f"{name}::idx"] = idx.to(torch.int32)
            flat = flat[idx]
        out.update(_encode_values(name, flat, t.shape if not cfg.topk else None, cfg))
    return out


def _encode_values(name: str, flat: torch.Tensor, shape: torch.Size | None, cfg: CodecConfig
                   ) -> dict[str, torch.Tensor]:
    if cfg.kind in ("fp32", "bf16"):
        v = flat.to(torch.float32 if cfg.kind == "fp32" else torch.bfloat16)
        return {f"{name}::val": v if shape is None else v.reshape(shape)}
    qmax = _QMAX[cfg.kind]
    n_blocks = math.ceil(flat.numel() / cfg.block)
    blocks = torch.zeros(n_blocks * cfg.block)
    blocks[: flat.numel()] = flat
    blocks = blocks.reshape(n_blocks, cfg.block)
    scale = blocks.abs().amax(dim=1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    if cfg.kind == "int4":  # two values per byte, each stored as q + 8 in 1..15
        u = (q + 8).to(torch.uint8)
        q = (u[:, 0::2] << 4) | u[:, 1::2]
    return {f"{name}::q": q, f"{name}::scale": scale}


def decode(encoded: dict[str, torch.Tensor], shapes: dict[str, torch.Size], cfg: CodecConfig
           ) -> dict[str, torch.Tensor]:
    """float32 tensors of the given ``shapes`` from :func:`encode`'s output.

    Raises :class:`~atoll.errors.WireError` naming the tensor and the problem if anything is
    missing, extra, of the wrong size or dtype."""
    expected_parts = set()
    out = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if cfg.topk:
            k = _kept(cfg.topk, numel)
            idx = _part(encoded, name, "idx", torch.int32, (k,))
            if k and (idx.min() < 0 or idx.max() >= numel):
                raise WireError(f"tensor {name!r}: top-k index out of range")
            values = _decode_values(encoded, name, k, None, cfg)
            dense = torch.zeros(numel)
            dense[idx.long()] = values
            out[name] = dense.reshape(shape)
            expected_parts.add(f"{name}::idx")
        else:
            out[name] = _decode_values(encoded, name, numel, shape, cfg)
        expected_parts |= ({f"{name}::val"} if cfg.kind in ("fp32", "bf16")
                           else {f"{name}::q", f"{name}::scale"})
    extra = sorted(set(encoded) - expected_parts)
    if extra:
        raise WireError(f"unexpected tensor {extra[0]!r}")
    return out


def _kept(fraction: float, numel: int) -> int:
    """How many entries top-k keeps of a tensor of ``numel``: at least one, if any."""
    return min(numel, max(1, math.ceil(fraction * numel)))


def _part(encoded: dict[str, torch.Tensor], name: str, part: str, dtype: torch.dtype,
          shape: tuple[int, ...]) -> torch.Tensor:
    key = f"{name}::{part}"
    if key not in encoded:
        raise WireError(f"tensor {name!r}: part '{part}' is missing")
    t = encoded[key]
    if t.dtype != dtype:
        raise WireError(f"tensor {name!r}: part '{part}' is {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise WireError(f"tensor {name!r}: part '{part}' has shape {tuple(t.shape)}, "
                        f"expected {tuple(shape)} (truncated or from another model?)")
    return t


def _decode_values(encoded: dict[str, torch.Tensor], name: str, numel: int,
                   shape: torch.Size | None, cfg: CodecConfig) -> torch.Tensor:
    if cfg.kind in ("fp32", "bf16"):
        dtype = torch.float32 if cfg.kind == "fp32" else torch.bfloat16
        v = _part(encoded, name, "val", dtype, tuple(shape) if shape is not None else (numel,))
        return v.float()
    n_blocks = math.ceil(numel / cfg.block)
    width = cfg.block // 2 if cfg.kind == "int4" else cfg.block
    q = _part(encoded, name, "q", torch.uint8 if cfg.kind == "int4" else torch.int8,
              (n_blocks, width))
    scale = _part(encoded, name, "scale", torch.float32, (n_blocks,))
    if cfg.kind == "int4":
        hi, lo = (q >> 4).to(torch.int8) - 8, (q & 0x0F).to(torch.int8) - 8
        q = torch.stack([hi, lo], dim=2).reshape(n_blocks, cfg.block)
    values = (q.float() * scale[:, None]).reshape(-1)[:numel]
    return values if shape is None else values.reshape(shape)


class ErrorFeedback:
    """The residual a site keeps: ``send = delta + residual``, ``residual = send - decoded``."""

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def encode(self, delta: dict[str, torch.Tensor], cfg: CodecConfig
               ) -> dict[str, torch.Tensor]:
        send = {k: v + self.residual[k] if k in self.residual else v for k, v in delta.items()}
        encoded = encode(send, cfg)
        decoded = decode(encoded, {k: v.shape for k, v in send.items()}, cfg)
        self.residual = {k: send[k] - decoded[k] for k in send}
        return encoded
