"""The exact size of what a round puts on the wire, from the model's tensor shapes alone.

A message is a JSON header (:func:`atoll.federation.protocol.header`) and a safetensors blob
of its tensors (:func:`atoll.federation.protocol.tensor_bytes`). The blob's size follows from
the wire tensors' names, dtypes and shapes: 8 bytes of length, the blob's own JSON table
(tensors ordered by dtype, widest first, then by name; padded with spaces to a multiple of
8 bytes, as ``safetensors`` writes it) and the raw values. The JSON header holds numbers
that vary from round to round (a loss, timings, a signature), so only its typical size is
known: :data:`UPDATE_HEADER_BYTES` and :data:`PLAN_HEADER_BYTES` are what real rounds of
the demo measured, stated as estimates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from atoll.federation.codecs import CodecConfig
from atoll.federation.wire_parts import packed, parts_of

WireTensors = dict[str, tuple[torch.dtype, tuple[int, ...]]]

# safetensors' names of the dtypes atoll's codecs send, and the order it lays them out in
_DTYPES = {torch.float32: ("F32", 3), torch.bfloat16: ("BF16", 2), torch.int8: ("I8", 1),
           torch.uint8: ("U8", 0)}

UPDATE_HEADER_BYTES = 900
"""An update's JSON header (counts, timings, the signed receipt of what was read): 850-860
bytes measured for a site reading one data source; more for each further source."""
PLAN_HEADER_BYTES = 490
"""A plan's JSON header without the run spec (later rounds), with the signed ledger head
(about 240 bytes of it): 480-490 bytes measured."""


def wire_tensors(shapes: Mapping[str, tuple[int, ...]], codec: CodecConfig) -> WireTensors:
    """The tensors :func:`atoll.federation.codecs.encode` sends for ``shapes``: one
    ``<name>::val`` each for plain fp32/bf16, else one packed tensor per part."""
    if not packed(codec.kind, codec.topk):
        dtype = torch.float32 if codec.kind == "fp32" else torch.bfloat16
        return {f"{n}::val": (dtype, tuple(s)) for n, s in shapes.items()}
    total: dict[str, list] = {}
    for n in sorted(shapes):
        for part, (dtype, shape) in parts_of(math.prod(shapes[n]), codec.kind, codec.block,
                                             codec.topk, codec.select).items():
            entry = total.setdefault(f"::{part}", [dtype, 0])
            entry[1] += math.prod(shape)
    return {name: (dtype, (size,)) for name, (dtype, size) in total.items()}


def blob_bytes(tensors: WireTensors) -> int:
    """The size of the safetensors blob of ``tensors``, exactly as ``safetensors`` writes it."""
    order = sorted(tensors, key=lambda n: (-_DTYPES[tensors[n][0]][1], n))
    table, at = {}, 0
    for name in order:
        dtype, shape = tensors[name]
        size = math.prod(shape) * dtype.itemsize
        table[name] = {"dtype": _DTYPES[dtype][0], "shape": list(shape),
                       "data_offsets": [at, at + size]}
        at += size
    head = len(json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + head + (-head % 8) + at


def payload_bytes(shapes: Mapping[str, tuple[int, ...]], codec: CodecConfig) -> int:
    """The blob of tensors of ``shapes`` encoded with ``codec``."""
    return blob_bytes(wire_tensors(shapes, codec)) if shapes else blob_bytes({})


def data_parallel_bytes(params: int, sites: int, steps: int, grad_bytes: int = 4) -> float:
    """Bytes that data-parallel training of ``params`` values among ``sites`` machines puts
    on the wire in ``steps`` steps, every machine's sends and receives together: a ring
    all-reduce after every step, in which each machine sends and receives
    ``2 (n - 1) / n`` of the gradient (``grad_bytes`` per value: 4 for fp32, 2 for bf16)."""
    if sites < 2:
        return 0.0
    per_machine_step = 2 * 2 * (sites - 1) / sites * params * grad_bytes
    return per_machine_step * sites * steps
