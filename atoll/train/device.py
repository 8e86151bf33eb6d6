"""Where and in what precision a site trains, and the copies between host and device.

The device is a property of the site's machine (``auto``, ``cpu``, ``cuda``, ``cuda:N``), not
of the run: one federation mixes laptops and GPU nodes. The precision is a training setting
of the run (``inner.precision``): ``bf16`` runs forward and backward under bf16 autocast while
the weights, gradients and AdamW state stay fp32 (the master copy); ``auto`` is bf16 on CUDA
and fp32 on a CPU, where bf16 autocast is emulated and several times slower unless the CPU
has AMX.

Weights cross between host and device only at a round's edges: the received weights go in
(:func:`to_device`, through pinned memory, non-blocking) and the trained weights come out
(:func:`to_host`, fp32, one synchronisation for the whole model). On a CPU both are free:
the tensors are used where they are.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "bf16", "fp32")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    """Refuse a device name atoll does not know (whether this machine has it is checked by
    :func:`resolve_device`, on the site's own machine)."""
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {name!r}")


def resolve_device(name: str = "auto") -> torch.device:
    """The device ``name`` means on this machine: ``auto`` is the first CUDA device when
    there is one, else the CPU. Asking for CUDA where there is none is an error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise RuntimeError(f"device {name!r} asked for, but {why} "
                               f"(torch {torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RuntimeError(f"device {name!r} asked for, but this machine has {count} "
                               f"CUDA device(s): cuda:0 to cuda:{count - 1}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``: what ``inner.precision`` means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"inner.precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def prepare_device(device: torch.device) -> None:
    """Let fp32 matrix products on CUDA use TF32 tensor cores (what autocast leaves in fp32,
    and all of an ``fp32`` run). Nothing changes on a CPU."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: from pinned host memory without blocking when the device is
    a GPU; the tensor itself when it is already there."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_device_all(tensors: dict[str, torch.Tensor], device: torch.device
                  ) -> dict[str, torch.Tensor]:
    """:func:`to_device` for a dict of named tensors (the weights a round starts from)."""
    return {name: to_device(t, device) for name, t in tensors.items()}


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of named tensors (detached), for what leaves the device: from a GPU
    into pinned buffers without blocking, then one synchronisation; CPU fp32 tensors are
    returned as they are, not copied."""
    out: dict[str, torch.Tensor] = {}
    waiting: set[torch.device] = set()
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type == "cpu":
            out[name] = t.float()  # no copy when it is fp32 already
            continue
        buffer = torch.empty(t.shape, dtype=torch.float32, pin_memory=t.device.type == "cuda")
        buffer.copy_(t, non_blocking=True)
        out[name] = buffer
        if t.device.type == "cuda":
            waiting.add(t.device)
    for device in waiting:
        torch.cuda.synchronize(device)
    return out
