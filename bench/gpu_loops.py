"""The two loops ``bench/gpu.py`` compares, and what they share: the models, the batches, the
timing. The baseline (:class:`BareLoop`) is written with PyTorch alone, not with atoll's
trainer, so that the ratio measures what the site trainer adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from atoll.model import PRESETS
from atoll.tokenizer import BYTE_VOCAB
from atoll.train.inner import InnerConfig, InnerTrainer


def preset_config(name: str) -> LlamaConfig:
    """The preset with its vocabulary: byte-level for tiny and small, 32k for the rest."""
    if name not in PRESETS:
        raise SystemExit(f"bench/gpu.py: unknown preset {name!r} (one of {', '.join(PRESETS)})")
    return PRESETS[name](BYTE_VOCAB if name in ("tiny", "small") else 32_000)


def build(cfg: LlamaConfig, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A fresh fp32 model of ``cfg``, initialised on ``device`` itself."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.to(device)


def random_batches(vocab: int, micro: int, seq_len: int, count: int, seed: int = 0
                   ) -> list[torch.Tensor]:
    """``count`` micro-batches of token ids on the host, the same for every loop."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (micro, seq_len), generator=g) for _ in range(count)]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings must cover it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """The baseline: forward, backward, clip, AdamW, written with PyTorch alone."""

    def __init__(self, model: torch.nn.Module, cfg: InnerConfig, device: torch.device,
                 bf16: bool) -> None:
        """The same hyper-parameters as the site's ``cfg``; fused AdamW on CUDA."""
        self.model, self.device, self.bf16, self.clip = model, device, bf16, cfg.grad_clip
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for what stays fp32
        if cfg.activation_checkpointing:
            kwargs = {"use_reentrant": False}  # the name changed in transformers 5
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           eps=cfg.eps, fused=device.type == "cuda" or None)
        self.forward = torch.compile(model) if cfg.compile else model

    def steps(self, micro_batches: list[torch.Tensor], accum: int) -> list[float]:
        """One optimizer step per ``accum`` micro-batches; each step's loss."""
        self.model.train()
        losses: list[list[torch.Tensor]] = []
        for i in range(0, len(micro_batches), accum):
            step = []
            for batch in micro_batches[i:i + accum]:
                batch = batch.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                    loss = self.forward(input_ids=batch, labels=batch).loss / accum
                loss.backward()
                step.append(loss.detach())
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(step)
        return [sum(loss.item() for loss in step) for step in losses]  # one wait, at the end


def site_steps(trainer: InnerTrainer, micro_batches: list[torch.Tensor], steps: int
               ) -> list[float]:
    """``steps`` steps of the site trainer's own loop (``InnerTrainer.run``); their losses."""
    feed, losses = iter(micro_batches), []
    trainer.run(lambda: next(feed), max_steps=steps, on_step=lambda _, loss: losses.append(loss))
    return losses


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """What a loop keeps between steps: weights, gradients if any, AdamW state."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()
                                                 if p.grad is not None]
    tensors += [t for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed(device: torch.device, run: Callable[[], list[float]], other_resident: int
          ) -> tuple[float, list[float], int]:
    """Seconds, losses and peak device bytes of ``run()`` (the other loop's state left out)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = run()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - other_resident if device.type == "cuda" else 0
    return seconds, losses, peak


def inner_config(micro: int, accum: int, precision: str, compile: bool = False,
                 checkpointing: bool = False) -> InnerConfig:
    """The site's settings: its defaults, with a constant learning rate (no warm-up, no
    decay) so that the bare loop needs no schedule to match it."""
    return InnerConfig(warmup_steps=0, min_lr_ratio=1.0, batch_size=micro, grad_accum=accum,
                       precision=precision, compile=compile,
                       activation_checkpointing=checkpointing)


@torch.no_grad()
def weight_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||a - b|| / ||a|| over all parameters: how far two loops' models ended apart."""
    diff = total = 0.0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        diff += float((p.float() - q.float()).pow(2).sum())
        total += float(p.float().pow(2).sum())
    return (diff / max(total, 1e-30)) ** 0.5
