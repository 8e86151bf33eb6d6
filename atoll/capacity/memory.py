"""What one device of a site holds while it trains: weights, gradients, AdamW's state and
the activations kept for the backward pass.

Weights, gradients and both AdamW moments are float32 whatever the precision (atoll's bf16
is autocast over fp32 master weights), so 16 bytes a parameter, which is also the rule
:func:`atoll.train.distributed.fits` uses to choose FSDP2: a site of several GPUs shards
them (``/ gpus``) when 16 bytes a parameter exceed 80% of one GPU, and replicates them
(DDP) otherwise. Activations are per token of a micro-batch, measured on this machine with
``torch.autograd.graph.saved_tensors_hooks`` on Hugging Face's Llama (SDPA attention, so no
``seq x seq`` scores are kept) and fitted per layer; tests check the fit against the
measurement. With bf16 autocast each weight is also cast once per step into a bf16 copy
that the backward keeps. With activation checkpointing a layer keeps only its input, and
one layer's activations exist again while it is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

from atoll.capacity.flops import parameter_count

FSDP_HEADROOM = 0.8
"""As :func:`atoll.train.distributed.fits`: replicate while 16 B/param fit in 80% of a GPU."""
GIB = 1024**3


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device holds at the peak of a training step."""

    weights: int
    """float32 master weights (this device's shard under FSDP)."""
    grads: int
    """float32 gradients (likewise)."""
    optimizer: int
    """AdamW's two float32 moments (likewise)."""
    activations: int
    """Kept for the backward pass at this device's micro-batch and the sequence length,
    with the bf16 copies of the weights autocast keeps."""
    sharded: bool
    """FSDP2 (weights, gradients and state divided among the site's GPUs) rather than DDP."""

    @property
    def total(self) -> int:
        """All of it (allocator slack and CUDA context not included)."""
        return self.weights + self.grads + self.optimizer + self.activations


def activation_bytes_per_token(cfg: LlamaConfig, bf16: bool, checkpointing: bool) -> float:
    """Bytes kept for the backward per token of a micro-batch (weight copies excluded)."""
    h, f, layers, vocab = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                           cfg.vocab_size)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv = (cfg.num_key_value_heads or heads) * head_dim
    if bf16:  # the residual stream and norms stay fp32, the matmuls' outputs are bf16
        layer = 30 * h + 4 * kv + 8 * f + 4 * heads
        rest = 5 * vocab + 10 * h
    else:
        layer = 32 * h + 8 * kv + 16 * f + 4 * heads
        rest = 4 * vocab + 12 * h
    if checkpointing:  # each layer's fp32 input, and one layer again while recomputed
        return layers * 4 * h + layer + rest
    return layers * layer + rest


def sharded(params: int, gpus: int, memory_gib: float) -> bool:
    """Whether a site of ``gpus`` devices of ``memory_gib`` shards the model (FSDP2)."""
    return gpus > 1 and 16 * params > FSDP_HEADROOM * memory_gib * GIB


def device_memory(cfg: LlamaConfig, micro_batch: int, seq_len: int, gpus: int,
                  memory_gib: float, bf16: bool, checkpointing: bool = False) -> DeviceMemory:
    """One device's peak while training ``cfg`` on ``micro_batch`` x ``seq_len`` tokens
    (``memory_gib`` 0: a CPU, which never shards)."""
    count = parameter_count(cfg)
    shard = bool(memory_gib) and sharded(count.total, gpus, memory_gib)
    per = -(-count.total // gpus) if shard else count.total
    tokens = micro_batch * seq_len
    acts = activation_bytes_per_token(cfg, bf16, checkpointing) * tokens
    if bf16:  # autocast's bf16 copy of every matmul weight, kept from forward to backward
        acts += 2 * (count.matmul // gpus if shard else count.matmul)
    return DeviceMemory(weights=4 * per, grads=4 * per, optimizer=8 * per,
                        activations=int(acts), sharded=shard)
