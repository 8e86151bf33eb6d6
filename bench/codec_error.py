"""What each codec keeps of one tensor: bits per value on the wire and relative error.

One encode and decode of 2^20 values (no error feedback) from two distributions: Gaussian,
and Student's t with 3 degrees of freedom (heavy tails, closer to a pseudo-gradient, whose
few large entries carry much of its norm). The error is ||decoded - x|| / ||x||; the bits
are the real serialized size (safetensors, header included) over the number of values.
Deterministic (seeded): the same command prints the same figures.

    python bench/codec_error.py [--n 1048576] [--codecs int4/64,int2/128,sign/256] [--smoke]
"""

from __future__ import annotations

import argparse

import torch
from smoke import parse

from atoll.federation.codecs import decode, encode, parse_spec
from atoll.federation.protocol import tensor_bytes

CODECS = ("fp32", "bf16", "int8/64", "int4/64", "int2/64", "int2/128", "int2/256",
          "sign/64", "sign/256", "int2/64+top0.03125")


def samples(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(n, generator=g)
    # t(3) = z / sqrt(chi2(3) / 3)
    chi2 = torch.randn(3, n, generator=g).pow(2).sum(0)
    return {"Gaussian": gauss, "Student t(3)": torch.randn(n, generator=g) / (chi2 / 3).sqrt()}


def measure(x: torch.Tensor, spec: str) -> tuple[float, float]:
    """Bits per value on the wire and relative L2 error of one round trip of ``x``."""
    cfg = parse_spec(spec)
    wire = encode({"x": x}, cfg)
    back = decode(wire, {"x": x.shape}, cfg)["x"]
    return 8 * len(tensor_bytes(wire)) / x.numel(), float((back - x).norm() / x.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 20, help="values per tensor")
    ap.add_argument("--codecs", default=",".join(CODECS), help="codec specs, comma-separated")
    args = parse(ap, {"n": 4096})
    data = samples(args.n)
    print(f"{'codec':<22}{'bits/value':>11}{'vs fp32':>9}" +
          "".join(f"{'error, ' + name:>22}" for name in data))
    for spec in args.codecs.split(","):
        results = [measure(x, spec) for x in data.values()]
        bits = results[0][0]
        print(f"{spec:<22}{bits:11.3f}{32 / bits:8.1f}x" +
              "".join(f"{err:22.3f}" for _, err in results))


if __name__ == "__main__":
    main()
