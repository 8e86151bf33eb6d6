"""Several processes training one site's inner steps together, on torch.distributed.

A site may be many GPUs (or many CPU processes, or a few machines under ``torchrun``). They
train as one: every process draws the *same global batch* from an identically seeded reader
(so the cursor, restarts and consent filtering are exactly those of one process) and keeps
its own contiguous ``1/world`` share of the rows (:meth:`Parallel.local_rows`). The gradients
are averaged across processes, by DDP, or by FSDP2 (``fully_shard``: each decoder layer, then
the root) when the weights and AdamW state are sharded (asked for, or when one GPU cannot
hold them: :func:`fits`). With equal shares, the mean of the per-process mean losses is the
global batch's mean loss, so N processes take the same steps as one process with the whole
batch, up to float rounding.

Only rank 0 speaks for the site. The full fp32 tensors of a (possibly sharded) model leave it
one at a time (:meth:`Parallel.full_tensors`), so the pseudo-gradient is formed as a stream
and no process ever holds a second full copy of the weights. One process (``world == 1``)
is the same object with nothing to do, so callers keep a single code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from atoll.train.device import to_device, to_host

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers")  # where decoders keep them


def launched() -> bool:
    """Whether this process was started as one of several (``torchrun`` or ``--nproc``:
    ``WORLD_SIZE`` above 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: torch.device) -> torch.device:
    """This process's device: on CUDA, the GPU of its ``LOCAL_RANK`` (one GPU a process)."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@dataclass
class Parallel:
    """This process's place among a site's processes, and how the model is spread."""

    rank: int = 0
    world: int = 1
    shard: bool = False
    """Shard weights, gradients and AdamW state with FSDP2 instead of replicating them."""

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that speaks for the site."""
        return self.rank == 0

    @staticmethod
    def from_env(device: torch.device, shard: bool = False,
                 timeout_s: float = 600.0) -> Parallel:
        """Join the process group ``torchrun`` (or ``--nproc``) described in the environment
        (gloo on a CPU, nccl on CUDA); one process when there is none to join."""
        if not launched():
            return Parallel(shard=False)
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(BACKENDS[device.type], timeout=timedelta(seconds=timeout_s))
        return Parallel(dist.get_rank(), dist.get_world_size(), shard)

    # -- the model -------------------------------------------------------------------------

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward through: ``model`` itself (one process, or FSDP2, which
        shards it in place: build the optimizer after this), or a DDP wrapper sharing its
        parameters. ``model`` keeps its own parameter names either way."""
        if self.world == 1:
            return model
        if not self.shard:  # sharded anyway when one GPU cannot hold it all (rank 0 says)
            self.shard = bool(self.broadcast(not fits(model)))
        if not self.shard:
            return torch.nn.parallel.DistributedDataParallel(model)
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model

    def full_tensors(self, model: torch.nn.Module, names: Iterable[str] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """``(name, fp32 CPU tensor)`` for ``names`` (default: all parameters, in model
        order), one tensor at a time, gathered from the shards; ``None`` in place of the
        tensor on ranks other than 0. Every rank must walk the whole stream (each gather is
        collective)."""
        params = dict(model.named_parameters())
        for name in (list(params) if names is None else names):
            p = params[name].detach()
            if hasattr(p, "full_tensor"):  # a DTensor: gathered, then dropped off rank 0
                p = p.full_tensor()
            yield name, (p.to("cpu", torch.float32, copy=True) if self.is_main else None)

    def load(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor],
             alpha: float = 0.0) -> None:
        """Set parameters from full tensors held by every rank: ``p = alpha*p + (1-alpha)*w``
        (each rank keeps its own shard of ``w`` under FSDP2)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, w in tensors.items():
                p = params[name]
                if hasattr(p, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    w = distribute_tensor(w.to(p.device, p.dtype), p.device_mesh, p.placements)
                else:
                    w = to_device(w, p.device)
                p.mul_(alpha).add_(w, alpha=1 - alpha)

    # -- what each rank saves -------------------------------------------------------------

    def state_dir(self, root: Path) -> Path:
        """Where this rank keeps its own saved state (its shards, under FSDP2): ``root``
        itself on rank 0, ``root/rank-R`` on the others."""
        return Path(root) if self.is_main else Path(root) / f"rank-{self.rank}"

    def local_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """fp32 host copies of this rank's part of every parameter (the whole of it unless
        sharded), to save."""
        return to_host({n: _local(p) for n, p in model.named_parameters()})

    def load_local_weights(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]
                           ) -> None:
        """Put back what :meth:`local_weights` saved, in place."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, w in weights.items():
                _local(params[name]).copy_(w)

    def local_state(self, tree: Any) -> Any:
        """``tree`` (an optimizer's state dict) with each sharded tensor replaced by this
        rank's shard of it, so it saves as plain tensors."""
        if isinstance(tree, dict):
            return {k: self.local_state(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.local_state(v) for v in tree)
        return _local(tree) if isinstance(tree, torch.Tensor) else tree

    def sharded_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        """An optimizer state dict saved by :meth:`local_state`, its per-parameter tensors
        made shards of their parameters again (ready for ``load_state_dict``)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        out = dict(state, state={})
        for index, entry in state["state"].items():
            p = params[int(index)]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor

                entry = {k: DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                               shape=p.shape, stride=p.stride())
                         if isinstance(v, torch.Tensor) and v.ndim else v
                         for k, v in entry.items()}
            out["state"][index] = entry
        return out

    # -- the data --------------------------------------------------------------------------

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous ``1/world`` share of a global ``[B, T]`` batch."""
        if self.world == 1:
            return batch
        if len(batch) % self.world:
            raise ValueError(f"inner.batch_size {len(batch)} must be a multiple of the "
                             f"site's {self.world} processes")
        share = len(batch) // self.world
        return batch[self.rank * share : (self.rank + 1) * share]

    def batches(self, next_batch: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """``next_batch`` of the global reader, narrowed to this rank's rows."""
        if self.world == 1:
            return next_batch
        return lambda: self.local_rows(next_batch())

    # -- rank 0 to the others --------------------------------------------------------------

    def broadcast(self, obj: Any) -> Any:
        """``obj`` as rank 0 holds it, on every rank (pickled; for plans and small state)."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank must ask, at the same point)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([float(flag)], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (a loss each measured on its share)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.item() / self.world

    def _comm_device(self) -> torch.device:
        """Where small tensors for a collective live: the GPU under nccl."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree(self, value: Any, what: str) -> None:
        """Refuse to go on unless every rank holds the same ``value`` (e.g. the round its
        saved state is from: a process whose state was lost would train out of step)."""
        if self.world == 1:
            return
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise ValueError(f"{what} differs between processes: {values}; give every "
                             f"process its saved state, or start the site afresh")

    def close(self) -> None:
        """Leave the process group (when this process joined one)."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def training_bytes(model: torch.nn.Module) -> int:
    """What training ``model`` replicated holds per device, before activations: fp32
    weights, gradients and the two AdamW moments."""
    return 16 * sum(p.numel() for p in model.parameters())


def fits(model: torch.nn.Module, headroom: float = 0.8) -> bool:
    """Whether one device can train ``model`` replicated, with ``1 - headroom`` of its
    memory left for activations (a CPU is taken to fit)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return True
    total = torch.cuda.get_device_properties(device).total_memory
    return training_bytes(model) <= headroom * total


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: its shard of a DTensor, or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one (so one is gathered at a time)."""
    for path in LAYER_LISTS:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList):
            return list(module)
    raise ValueError(f"site.shard: cannot find the decoder layers of {type(model).__name__} "
                     f"(looked for {', '.join(LAYER_LISTS)})")
