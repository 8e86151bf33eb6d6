"""A federation's cost before anything is rented: per site, memory, speed, bytes and time a
round; for the federation, rounds and wall time to a token budget, and what data-parallel
training over the same links would take.

Every site is taken to be alike (``sites`` of ``gpus_per_site`` GPUs each, on the same
link). A round is: the plan comes down, the site trains ``steps_per_round`` steps, the
update goes up. Without overlap these add up; with overlap (streaming, Douillard et al.
2025) the transfers run behind the next steps' compute, hidden up to its length. The
data-parallel comparison is a ring all-reduce of the gradients among the sites every step
at the same global batch: each site sends and receives ``2 (n - 1) / n`` gradients a step
(``dp_grad_bytes`` a value: bf16 by default), with ``2 (n - 1)`` latencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from atoll.capacity.flops import gpu_named, parameter_count, train_flops_per_token
from atoll.capacity.memory import GIB, DeviceMemory, device_memory
from atoll.capacity.network import transfer_seconds
from atoll.capacity.wire import (
    PLAN_HEADER_BYTES,
    UPDATE_HEADER_BYTES,
    data_parallel_bytes,
    payload_bytes,
)
from atoll.federation.codecs import CodecConfig
from atoll.federation.fragments import split_fragments

Shapes = dict[str, tuple[int, ...]]


@dataclass
class PlanConfig:
    """What a planned federation is made of."""

    model: LlamaConfig
    """The model's Hugging Face config (a preset's, or any ``config.json``)."""
    model_name: str = "model"
    """How the table names it."""
    sites: int = 4
    """Sites taking part in every round, all alike."""
    gpus_per_site: int = 1
    gpu: str = "h100"
    """A GPU of :data:`atoll.capacity.flops.GPUS`, or ``cpu`` (needs ``tokens_per_second``)."""
    tokens_per_second: float = 0.0
    """Measured training tokens/s of one whole site; 0 = FLOPs per token x the GPU's peak x MFU."""
    mfu: float = 0.0
    """Model FLOPs utilisation to assume; 0 = the GPU table's stated assumption."""
    batch_size: int = 16
    """Sequences per micro-batch of the site (split among its GPUs), as ``inner.batch_size``."""
    grad_accum: int = 1
    seq_len: int = 2048
    steps_per_round: int = 500
    """Inner steps per round (H)."""
    precision: str = "auto"
    """``bf16`` / ``fp32``; ``auto``: bf16 on GPUs, fp32 on a CPU (as ``inner.precision``)."""
    activation_checkpointing: bool = False
    up: CodecConfig = field(default_factory=CodecConfig)
    """Uplink codec (pseudo-gradients)."""
    down: CodecConfig = field(default_factory=CodecConfig)
    """Downlink codec (weights, or their change with ``delta``)."""
    fragments: int = 1
    """Streaming: one of this many fragments synced per round."""
    overlap: bool = False
    """Whether transfers run behind compute (streaming with overlap steps)."""
    uplink: float = 1e8
    """Site -> coordinator, bit/s (0 = no limit)."""
    downlink: float = 0.0
    """Coordinator -> site, bit/s; 0 = as ``uplink``."""
    latency: float = 0.0
    """One way, seconds."""
    coordinator_link: float = 0.0
    """The coordinator's own link, bit/s, shared by every site's messages (0 = no limit)."""
    token_budget: float = 0.0
    """Tokens to train on; 0 = 20 per parameter (Chinchilla)."""
    dp_grad_bytes: int = 2
    """Bytes per gradient value in the data-parallel comparison (2: bf16 all-reduce)."""

    def check(self) -> None:
        """Refuse a plan that cannot be costed, naming the setting."""
        if self.sites < 1 or self.gpus_per_site < 1 or self.steps_per_round < 1:
            raise ValueError("sites, gpus-per-site and steps-per-round must be at least 1")
        if self.batch_size < 1 or self.grad_accum < 1 or self.seq_len < 2:
            raise ValueError("batch size and grad accum must be >= 1, seq-len >= 2")
        if self.gpu == "cpu" and not self.tokens_per_second:
            raise ValueError("planning for a CPU (--gpu cpu, or a config that trains on this "
                             "CPU) needs --tokens-per-second: a CPU has no FLOP table")
        if self.gpu != "cpu":
            gpu_named(self.gpu)
        if self.precision not in ("auto", "bf16", "fp32") or not 0 <= self.mfu <= 1:
            raise ValueError("precision must be auto, bf16 or fp32; mfu in [0, 1]")
        for rate in (self.uplink, self.downlink, self.coordinator_link):
            if rate < 0:
                raise ValueError("link rates must be >= 0")

    @property
    def tokens_per_step(self) -> int:
        """Tokens one site trains on per inner step."""
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def bf16(self) -> bool:
        """Whether the sites train in bf16 autocast."""
        return self.precision == "bf16" or (self.precision == "auto" and self.gpu != "cpu")


@dataclass
class Traffic:
    """Bytes a site sends and receives in one round (mean over the fragments)."""

    up_payload: float
    """The update's safetensors blob: exact for the codec and the shapes."""
    down_payload: float
    """The plan's blob, likewise (later rounds: the first sends the weights whole)."""
    up: float
    """With the JSON header (an estimate, :data:`UPDATE_HEADER_BYTES`)."""
    down: float


@dataclass
class Plan:
    """The figures of a planned federation; ``seconds`` are per round unless named."""

    cfg: PlanConfig
    params: int
    memory: DeviceMemory
    memory_gib: float
    """One device's memory (0 = a CPU: not checked)."""
    flops_per_token: float
    tokens_per_second: float
    """One site."""
    mfu: float
    """Assumed (or, with a measured speed, implied; 0 on a CPU)."""
    traffic: Traffic
    compute_s: float
    transfer_s: float
    dp_step_comm_s: float
    """Data parallel: one all-reduce among the sites."""

    @property
    def parallel(self) -> str:
        """How a site spreads the model over its GPUs (as a real site chooses)."""
        if self.cfg.gpus_per_site == 1:
            return "one device"
        return "FSDP2" if self.memory.sharded else "DDP"

    @property
    def fits(self) -> bool:
        """Whether one device holds its share (always on a CPU)."""
        return not self.memory_gib or self.memory.total <= self.memory_gib * GIB

    @property
    def round_s(self) -> float:
        """A round with transfers and compute one after the other."""
        return self.compute_s + self.transfer_s

    @property
    def round_s_overlap(self) -> float:
        """A round with the transfers hidden behind compute up to its length."""
        return max(self.compute_s, self.transfer_s)

    @property
    def tokens_per_round(self) -> int:
        """Tokens the federation trains on per round."""
        return self.cfg.sites * self.cfg.steps_per_round * self.cfg.tokens_per_step

    @property
    def token_budget(self) -> float:
        """The budget planned for."""
        return self.cfg.token_budget or 20.0 * self.params

    @property
    def rounds(self) -> int:
        """Rounds to the token budget."""
        return math.ceil(self.token_budget / self.tokens_per_round)

    @property
    def dp_round_s(self) -> float:
        """Data parallel: the same tokens as a round, an all-reduce after every step."""
        return self.compute_s + self.cfg.steps_per_round * self.dp_step_comm_s

    @property
    def dp_bytes(self) -> float:
        """Data parallel: bytes a site sends plus receives for a round's tokens."""
        whole = data_parallel_bytes(self.params, self.cfg.sites, self.cfg.steps_per_round,
                                    self.cfg.dp_grad_bytes)
        return whole / self.cfg.sites

    @property
    def reduction(self) -> float:
        """Data-parallel bytes over the federation's, at equal tokens (0: one site)."""
        return self.dp_bytes / (self.traffic.up + self.traffic.down)


def model_shapes(cfg: LlamaConfig) -> Shapes:
    """The model's parameter names and shapes, from the module built on ``meta`` (no
    memory), as a site holds them."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def traffic(shapes: Shapes, cfg: PlanConfig) -> Traffic:
    """A round's bytes each way, averaged over the fragments (streaming sends one a round)."""
    groups = split_fragments(shapes, cfg.fragments)
    ups = [payload_bytes({n: shapes[n] for n in g}, cfg.up) for g in groups]
    downs = [payload_bytes({n: shapes[n] for n in g}, cfg.down) for g in groups]
    up, down = sum(ups) / len(ups), sum(downs) / len(downs)
    return Traffic(up_payload=up, down_payload=down, up=up + UPDATE_HEADER_BYTES,
                   down=down + PLAN_HEADER_BYTES)


def site_speed(cfg: PlanConfig, flops: float) -> tuple[float, float]:
    """One site's tokens/s and the MFU it stands for (assumed, or implied by a measurement)."""
    if cfg.gpu == "cpu":
        return cfg.tokens_per_second, 0.0
    gpu = gpu_named(cfg.gpu)
    peak = gpu.bf16_flops * cfg.gpus_per_site
    if cfg.tokens_per_second:
        return cfg.tokens_per_second, cfg.tokens_per_second * flops / peak
    mfu = cfg.mfu or gpu.mfu
    return peak * mfu / flops, mfu


def build(cfg: PlanConfig, shapes: Shapes | None = None) -> Plan:
    """The plan of ``cfg`` (``shapes``: the model's, if already known)."""
    cfg.check()
    shapes = shapes if shapes is not None else model_shapes(cfg.model)
    params = parameter_count(cfg.model).total
    memory_gib = 0.0 if cfg.gpu == "cpu" else gpu_named(cfg.gpu).memory_gib
    micro = -(-cfg.batch_size // cfg.gpus_per_site)
    memory = device_memory(cfg.model, micro, cfg.seq_len, cfg.gpus_per_site, memory_gib,
                           cfg.bf16, cfg.activation_checkpointing)
    flops = train_flops_per_token(cfg.model, cfg.seq_len)
    if cfg.activation_checkpointing:
        flops *= 4 / 3  # the forward again: what the GPU does, though MFU counts it not
    tps, mfu = site_speed(cfg, flops)
    t = traffic(shapes, cfg)
    down_rate = cfg.downlink or cfg.uplink
    transfer = (transfer_seconds(t.down, down_rate, cfg.latency) +
                transfer_seconds(t.up, cfg.uplink, cfg.latency))
    if cfg.coordinator_link:  # every site's messages share the coordinator's link
        transfer = max(transfer, transfer_seconds(cfg.sites * (t.up + t.down),
                                                  cfg.coordinator_link, 2 * cfg.latency))
    n = cfg.sites
    ring = 2 * (n - 1) / n * params * cfg.dp_grad_bytes
    dp_comm = transfer_seconds(ring, cfg.uplink, 2 * (n - 1) * cfg.latency) if n > 1 else 0.0
    return Plan(cfg=cfg, params=params, memory=memory, memory_gib=memory_gib,
                flops_per_token=flops, tokens_per_second=tps, mfu=mfu, traffic=t,
                compute_s=cfg.steps_per_round * cfg.tokens_per_step / tps,
                transfer_s=transfer, dp_step_comm_s=dp_comm)
