"""The inner (local) trainer: plain AdamW steps on a causal LM, nothing federated about it.

One optimizer step = ``grad_accum`` micro-batches, gradient clipping, AdamW with the
learning rate of the global step clock. The federated algorithm wraps this loop from outside
(:mod:`atoll.federation.site`); the loop itself is what a single-machine trainer would do,
which is what the overhead benchmark and the FedAvg-equals-plain-training test rely on.

It trains on whatever device the model is on (:mod:`atoll.train.device`): batches follow the
model there, the forward pass runs in the configured precision (bf16 autocast over fp32
weights and AdamW state, or plain fp32), and on CUDA AdamW is the fused kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from atoll.train.device import PRECISIONS, autocast, prepare_device, resolve_precision, to_device
from atoll.train.schedule import warmup_cosine


@dataclass
class InnerConfig:
    """Local optimisation at every site (and in the centralised baseline)."""

    lr: float = 3e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine ends at ``lr * min_lr_ratio``."""
    warmup_steps: int = 20
    total_steps: int = 0
    """Length of the cosine in inner steps; 0 = rounds x steps_per_round."""
    weight_decay: float = 0.1
    """Applied to matrices only (not to norms or biases)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    reset_state: bool = False
    """Start every round with a fresh AdamW state (DiLoCo) instead of keeping it (Photon)."""
    precision: str = "auto"
    """``bf16``: forward and backward in bf16 autocast, weights, gradients and AdamW state
    in fp32; ``fp32``; ``auto``: bf16 on CUDA, fp32 on a CPU (each site by its own device)."""
    compile: bool = False
    """Run the model's forward through ``torch.compile`` (the first steps pay for it)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them:
    less memory for about a third more compute; the same gradients."""

    def check(self) -> None:
        """Refuse values the trainer cannot use (the loader names the key)."""
        if self.lr <= 0:
            raise ValueError(f"inner.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"inner.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"inner.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "total_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"inner.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("inner.beta1 and inner.beta2 must be in [0, 1)")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("inner.grad_clip and inner.weight_decay must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"inner.precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (embeddings, projections), not vectors (norms, biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: torch.nn.Module, cfg: InnerConfig, fused: bool | None = None
                ) -> torch.optim.AdamW:
    """The inner AdamW over ``model``, weight decay on matrices only (:func:`param_groups`);
    ``fused`` (default: when the model is on CUDA) takes torch's one-kernel update."""
    if fused is None:
        fused = all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


@dataclass
class TrainResult:
    """What one stretch of inner training did."""

    steps: int
    tokens: int
    loss: float  # mean training loss over the steps
    seconds: float
    compute_seconds: float  # time inside forward/backward/step (excludes data waits)

    @staticmethod
    def combine(parts: list[TrainResult]) -> TrainResult:
        """One result for consecutive stretches of training."""
        steps = sum(p.steps for p in parts)
        return TrainResult(steps, sum(p.tokens for p in parts),
                           sum(p.loss * p.steps for p in parts) / max(steps, 1),
                           sum(p.seconds for p in parts), sum(p.compute_seconds for p in parts))


class InnerTrainer:
    """AdamW on ``model`` with a warm-up + cosine schedule on a global step clock, on the
    device the model is on."""

    def __init__(self, model: torch.nn.Module, cfg: InnerConfig, total_steps: int,
                 forward: torch.nn.Module | None = None) -> None:
        """``forward`` (default: ``model``) is what the batches run through: a data-parallel
        wrapper sharing ``model``'s parameters (:mod:`atoll.train.distributed`)."""
        self.model = model
        self.cfg = cfg
        self.total_steps = total_steps
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(cfg.precision, self.device)
        prepare_device(self.device)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        # the compiled module shares the model's parameters; the model itself stays plain
        # (its state dict keys, its use for evaluation)
        forward = model if forward is None else forward
        self.forward = torch.compile(forward) if cfg.compile else forward
        self.optimizer = build_adamw(model, cfg)
        self.step = 0  # global schedule position: inner steps since the run began

    def lr_at(self, step: int) -> float:
        """The learning rate at (0-based) step ``step``: linear warm-up, then cosine decay."""
        c = self.cfg
        return warmup_cosine(step, c.lr, c.warmup_steps, self.total_steps, c.min_lr_ratio)

    def train_step(self, micro_batches: list[torch.Tensor]) -> float:
        """One optimizer step over ``micro_batches`` (each ``[B, T]`` token ids); the mean loss."""
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        losses = []
        for batch in micro_batches:
            batch = to_device(batch, self.device)
            with autocast(self.device, self.precision):
                loss = self.forward(input_ids=batch, labels=batch).loss / len(micro_batches)
            loss.backward()
            losses.append(loss.detach())
        total = 0.0
        for loss in losses:  # read once the step's work is queued (one wait on a GPU)
            total += loss.item()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def run(self, next_batch: Callable[[], torch.Tensor], max_steps: int = 0,
            time_budget_s: float = 0.0,
            on_step: Callable[[int, float], None] | None = None,
            any_rank: Callable[[bool], bool] = bool) -> TrainResult:
        """Train for ``max_steps`` steps, or until ``time_budget_s`` seconds have passed.

        With both set, whichever comes first ends the stretch; at least one step is taken.
        ``any_rank`` makes the clock's verdict common to processes that step together (when
        one is out of time, all stop: :meth:`atoll.train.distributed.Parallel.any_rank`).
        """
        if max_steps <= 0 and time_budget_s <= 0:
            raise ValueError("give max_steps or time_budget_s")
        start = time.perf_counter()
        steps, tokens, loss_sum, compute = 0, 0, 0.0, 0.0
        while True:
            batches = [next_batch() for _ in range(self.cfg.grad_accum)]
            t0 = time.perf_counter()
            loss = self.train_step(batches)
            compute += time.perf_counter() - t0
            steps += 1
            tokens += sum(b.numel() for b in batches)
            loss_sum += loss
            if on_step is not None:
                on_step(steps, loss)
            if max_steps > 0 and steps >= max_steps:
                break
            if time_budget_s > 0 and any_rank(time.perf_counter() - start >= time_budget_s):
                break
        return TrainResult(steps, tokens, loss_sum / steps, time.perf_counter() - start, compute)

    def state_dict(self) -> dict:
        """The step count and AdamW state a site keeps between rounds."""
        return {"step": self.step, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`."""
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])

    def reset_optimizer(self) -> None:
        """A fresh AdamW state (for sites told not to keep theirs across rounds)."""
        self.optimizer = build_adamw(self.model, self.cfg)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (Hugging Face's
    activation checkpointing, non-reentrant: the same gradients as without)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"inner.activation_checkpointing: {type(model).__name__} does not "
                         f"support activation checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


StepCallback = Callable[[int, float], None]


def paced(on_step: StepCallback | None, pace_s: float) -> StepCallback | None:
    """``on_step``, plus a sleep that stretches each step to ``pace_s`` seconds (emulated
    slower hardware)."""
    if not pace_s:
        return on_step
    last = [time.perf_counter()]

    def step(n: int, loss: float) -> None:
        rest = pace_s - (time.perf_counter() - last[0])
        if rest > 0:
            time.sleep(rest)
        last[0] = time.perf_counter()
        if on_step is not None:
            on_step(n, loss)

    return step
