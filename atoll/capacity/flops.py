"""Parameters and training FLOPs of a Llama-family config, and the GPUs atoll knows.

Counts are taken from the config alone (no module is built), so a 70B plan costs nothing;
tests check them against the real modules built on the ``meta`` device. Training FLOPs per
token follow the usual accounting: 6 per matmul weight (2 forward, 4 backward) plus the
attention scores and their weighted sum, ``12 * layers * hidden * seq_len`` (counted whole,
as torchtitan and PaLM do, although a causal mask skips half). Embedding lookups cost no
FLOPs; the output head is a matmul and counts, tied to the embedding or not.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig


@dataclass(frozen=True)
class ParameterCount:
    """A model's parameters, by where they sit."""

    embedding: int
    """The input embedding table."""
    layers: int
    """All transformer blocks together (attention, MLP, their norms)."""
    head: int
    """The output head (0 when tied to the embedding) and the final norm."""
    largest_tensor: int
    """Elements of the largest single weight (the embedding or the head, in practice)."""
    matmul: int
    """Weights that take part in a matmul per token: blocks' projections and the head."""

    @property
    def total(self) -> int:
        """Every parameter once (a tied head counts with the embedding)."""
        return self.embedding + self.layers + self.head


def parameter_count(cfg: LlamaConfig) -> ParameterCount:
    """The parameters of ``cfg``, counted from its sizes."""
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    kv = (cfg.num_key_value_heads or cfg.num_attention_heads) * head_dim
    q = cfg.num_attention_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if getattr(cfg, "attention_bias", False):
        attention += q + 2 * kv + hidden
    mlp = 3 * hidden * cfg.intermediate_size
    if getattr(cfg, "mlp_bias", False):
        mlp += 2 * cfg.intermediate_size + hidden
    block = attention + mlp + 2 * hidden  # two RMSNorm weights
    tied = bool(cfg.tie_word_embeddings)
    head = hidden + (0 if tied else vocab * hidden)
    return ParameterCount(
        embedding=vocab * hidden,
        layers=cfg.num_hidden_layers * block,
        head=head,
        largest_tensor=max(vocab * hidden, hidden * cfg.intermediate_size),
        matmul=cfg.num_hidden_layers * (attention + mlp) + vocab * hidden,
    )


def train_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """FLOPs of one forward and backward pass, per token, at sequence length ``seq_len``."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    scores = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len
    return 6.0 * parameter_count(cfg).matmul + scores


@dataclass(frozen=True)
class GPU:
    """One accelerator type: what it can do at best, and what atoll assumes it achieves."""

    name: str
    """How people write it."""
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s (no sparsity)."""
    memory_gib: float
    """Device memory, GiB."""
    mfu: float
    """Model FLOPs utilisation assumed when none is measured: a stated assumption."""


# Peaks are the vendors' dense bf16 figures. The MFU assumptions come from published runs:
# torchtitan reports 40-50% for Llama models in bf16 on H100 (FSDP2, torch.compile) and
# INTELLECT-1 ran at 36-41%; 0.40 is used for data-centre parts, less for cards whose
# memory bandwidth or size holds them back at these model sizes.
GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM", 989e12, 80, 0.40),
    "h200": GPU("H200 SXM", 989e12, 141, 0.40),
    "a100": GPU("A100 SXM 80GB", 312e12, 80, 0.40),
    "a100-40gb": GPU("A100 40GB", 312e12, 40, 0.40),
    "l40s": GPU("L40S", 362e12, 48, 0.30),
    "a10": GPU("A10", 125e12, 24, 0.30),
    "rtx4090": GPU("RTX 4090", 165e12, 24, 0.30),
}


def gpu_named(name: str) -> GPU:
    """The GPU ``name`` (case and spaces ignored, e.g. ``H100``), or a clear error."""
    key = name.lower().replace(" ", "").replace("_", "-")
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r} (one of {', '.join(GPUS)})")
    return GPUS[key]


def gpu_of_device_name(device_name: str) -> GPU | None:
    """The table entry whose name appears in ``torch.cuda.get_device_name()``, if any."""
    text = device_name.lower().replace(" ", "")
    for key in sorted(GPUS, key=len, reverse=True):
        if key.split("-")[0] in text:
            return GPUS[key]
    return None
