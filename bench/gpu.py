"""The site trainer on a GPU: tokens/s and MFU against a bare PyTorch loop, and 7b's memory.

For each preset, atoll's inner trainer (:class:`atoll.train.inner.InnerTrainer`, as a site
runs it) and a plain PyTorch loop (``gpu_loops.BareLoop``) train two models built alike (the
preset, the seed) on the same batches (random token ids from a seeded generator), with the
same AdamW (decay on matrices only, fused on CUDA), learning rate (constant), clipping,
micro-batches, precision and, with ``--compile``, ``torch.compile``. After warm-up each runs
``reps`` times, in ABBA order so that drift in the machine's speed hits both alike; the
figures are medians and the ratio site / bare. The two must give the same losses, else the
comparison is void and the script exits 1. MFU = tokens/s x training FLOPs per token / the
GPU's dense bf16 peak (:mod:`atoll.capacity.flops`); on a CPU it is n/a unless
``--peak-tflops`` states one.

Then one training step of the memory preset (7b): measured where it fits the device, and
otherwise, and always on a CPU, the planned figure (16 B/param, bf16 copies of the
weights, activations).

    python bench/gpu.py [--preset 125m,1b] [--precision bf16] [--steps 20] [--reps 3] [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
from functools import partial

import torch
from gpu_loops import (
    BareLoop,
    build,
    inner_config,
    preset_config,
    random_batches,
    resident_bytes,
    site_steps,
    timed,
    weight_difference,
)
from smoke import parse
from transformers import AutoModelForCausalLM, LlamaConfig

from atoll.capacity.flops import gpu_of_device_name, parameter_count, train_flops_per_token
from atoll.train.device import resolve_device, resolve_precision
from atoll.train.inner import InnerTrainer

GIB = 2**30
# preset -> sequences per optimizer step, per micro-batch, sequence length (others: 1b's)
SHAPES = {"tiny": (16, 8, 128), "small": (8, 4, 256), "125m": (16, 8, 2048),
          "1b": (8, 4, 2048), "7b": (1, 1, 2048)}
SMOKE = {"preset": "tiny", "batch": 4, "micro": 2, "seq_len": 32, "steps": 2, "warmup": 1,
         "reps": 1}


def shape(args: argparse.Namespace, name: str) -> tuple[int, int, int]:
    """Sequences per step, per micro-batch and sequence length: the flags, else the preset's."""
    batch, micro, seq_len = SHAPES.get(name, SHAPES["1b"])
    batch, seq_len = args.batch or batch, args.seq_len or seq_len
    micro = args.micro or min(micro, batch)
    if batch % micro:
        raise SystemExit(f"bench/gpu.py: --batch {batch} is not a multiple of --micro {micro}")
    return batch, micro, seq_len


def compare(args: argparse.Namespace, name: str, device: torch.device, precision: str
            ) -> dict:
    """Site trainer against the bare loop on preset ``name``: times, losses, peaks."""
    cfg = preset_config(name)
    batch, micro, seq_len = shape(args, name)
    if device.type == "cuda":  # the previous preset's memory, back to the device
        gc.collect()
        torch.cuda.empty_cache()
    accum = batch // micro
    inner = inner_config(micro, accum, precision, args.compile,
                         args.activation_checkpointing)
    model = build(cfg, device)  # the same seed: the two models start equal
    bare = BareLoop(build(cfg, device), inner, device, precision == "bf16")
    total = args.warmup + args.reps * args.steps
    site = InnerTrainer(model, inner, total_steps=total)
    data = random_batches(cfg.vocab_size, micro, seq_len, total * accum)
    chunks = [data[:args.warmup * accum]] + [
        data[(args.warmup + r * args.steps) * accum:(args.warmup + (r + 1) * args.steps) * accum]
        for r in range(args.reps)]
    loops = {"site": (lambda c: site_steps(site, c, len(c) // accum), site),
             "bare": (lambda c: bare.steps(c, accum), bare)}
    losses: dict[str, list[float]] = {"site": [], "bare": []}
    seconds: dict[str, list[float]] = {"site": [], "bare": []}
    peaks = {"site": 0, "bare": 0}
    for rep, chunk in enumerate(chunks):  # chunk 0 is the warm-up
        for who, other in ([("site", "bare"), ("bare", "site")] if rep % 2 else
                           [("bare", "site"), ("site", "bare")]):  # ABBA: no order bias
            held = loops[other][1]  # the other loop's state, resident meanwhile
            s, loss, peak = timed(device, partial(loops[who][0], chunk),
                                  resident_bytes(held.model, held.optimizer))
            losses[who] += loss
            peaks[who] = max(peaks[who], peak)
            if rep > 0:
                seconds[who].append(s)
    tokens = args.steps * batch * seq_len
    return {"cfg": cfg, "shape": (batch, micro, seq_len), "losses": losses, "peaks": peaks,
            "weights": weight_difference(site.model, bare.model),
            "tps": {w: [tokens / s for s in seconds[w]] for w in seconds}}


def peak_flops(args: argparse.Namespace, device: torch.device, precision: str
               ) -> tuple[float, str]:
    """The peak MFU is taken against (0 = none) and where it comes from."""
    if args.peak_tflops > 0:
        return args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s as given (--peak-tflops)"
    if device.type != "cuda":
        return 0.0, "no peak stated for a CPU (--peak-tflops gives one)"
    gpu = gpu_of_device_name(torch.cuda.get_device_name(device))
    if gpu is None:
        return 0.0, "this GPU is not in atoll.capacity.flops.GPUS (--peak-tflops gives one)"
    if precision != "bf16":
        return 0.0, f"the table holds bf16 peaks only ({gpu.name}); run --precision bf16"
    return gpu.bf16_flops, f"dense bf16 peak of the {gpu.name}, {gpu.bf16_flops / 1e12:g} TFLOP/s"


def report(name: str, r: dict, args: argparse.Namespace, peak: float, precision: str) -> bool:
    """Print one preset's figures; whether the two loops gave the same losses."""
    cfg, (batch, micro, seq_len) = r["cfg"], r["shape"]
    flops = train_flops_per_token(cfg, seq_len)
    print(f"\n{name}: {parameter_count(cfg).total:,} parameters, {flops / 1e9:.3g} GFLOP/token; "
          f"{batch} x {seq_len} tokens a step in micro-batches of {micro}; {precision}, "
          f"compile {'on' if args.compile else 'off'}; {args.reps} x {args.steps} steps "
          f"after {args.warmup} warm-up")
    median = {w: statistics.median(t) for w, t in r["tps"].items()}
    labels = {"site": "site trainer (InnerTrainer.run)", "bare": "bare PyTorch loop"}
    for who, label in labels.items():
        mfu = f"{median[who] * flops / peak:6.1%}" if peak else "   n/a"
        mem = f"{r['peaks'][who] / GIB:6.2f} GiB" if r["peaks"][who] else "n/a on a CPU"
        print(f"  {label:32s} {median[who]:12,.0f} tokens/s  {median[who] * flops / 1e12:8.3f} "
              f"TFLOP/s  MFU {mfu}  peak memory {mem}")
    ratios = [s / b for s, b in zip(r["tps"]["site"], r["tps"]["bare"], strict=True)]
    print(f"  ratio site / bare: {median['site'] / median['bare']:.3f} (medians; per rep: "
          f"{' '.join(f'{x:.3f}' for x in ratios)})")
    site, bare = r["losses"]["site"], r["losses"]["bare"]
    worst = max(abs(s - b) / abs(b) for s, b in zip(site, bare, strict=True))
    tol = 2e-2 if precision == "bf16" else 1e-4
    same = len(site) == len(bare) and worst <= tol
    print(f"  same losses: {'yes' if same else 'NO, the comparison is void'} (max relative "
          f"difference {worst:.1e} over {len(site)} steps, tolerance {tol:.0e}; first "
          f"{site[0]:.4f}, last {site[-1]:.4f}); weights at the end: ||site - bare|| / ||site|| "
          f"= {r['weights']:.1e}")
    return same


def planned_bytes(cfg: LlamaConfig, micro: int, seq_len: int, bf16: bool, checkpointing: bool
                  ) -> tuple[int, int, int]:
    """Planned bytes of a training step: states, bf16 weight copies, activations.

    States: 16 B/param (fp32 weights, gradients, two AdamW moments). Under bf16 autocast the
    matmul weights' bf16 copies (2 B each) live until the backward has used them.
    Activations: 34 bytes per token per hidden unit per layer in 16-bit with fused attention
    (Korthikanti et al. 2022), twice that in fp32; with checkpointing each layer keeps its
    input and one layer is live; the logits about 12 B each (bf16, fp32 copy, log-softmax).
    """
    count = parameter_count(cfg)
    tokens, hidden, layers = micro * seq_len, cfg.hidden_size, cfg.num_hidden_layers
    per_layer = 34 * tokens * hidden * (1 if bf16 else 2)
    acts = (2 * tokens * hidden * layers + per_layer) if checkpointing else per_layer * layers
    return 16 * count.total, 2 * count.matmul if bf16 else 0, acts + 12 * tokens * cfg.vocab_size


def measure_step(args: argparse.Namespace, cfg: LlamaConfig, device: torch.device,
                 precision: str, micro: int, seq_len: int) -> tuple[int, float]:
    """Peak device bytes over two site-trainer steps of a fresh model, and the second's s."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model = build(cfg, device)
    trainer = InnerTrainer(model, inner_config(micro, 1, precision, False,
                                                    args.activation_checkpointing), total_steps=2)
    data = random_batches(cfg.vocab_size, micro, seq_len, 2)
    site_steps(trainer, data[:1], 1)  # the first step allocates AdamW's moments
    seconds, _, _ = timed(device, lambda: site_steps(trainer, data[1:], 1), 0)
    peak = torch.cuda.max_memory_allocated(device) - base
    return peak, seconds


def print_plan(name: str, cfg: LlamaConfig, micro: int, seq_len: int, precision: str,
               checkpointing: bool) -> tuple[int, int, int]:
    """Print the preset's parameter count (built on ``meta``) and its planned step memory."""
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    states, copies, acts = planned_bytes(cfg, micro, seq_len, precision == "bf16", checkpointing)
    agree = "agrees" if n == parameter_count(cfg).total else "DISAGREES"
    print(f"\n{name} memory: {n:,} parameters (built on the meta device; the planner's count "
          f"{agree})")
    print(f"  planned: {states / GIB:.1f} GiB weights, gradients and AdamW state (16 B/param) "
          f"+ {copies / GIB:.1f} GiB bf16 weight copies + {acts / GIB:.1f} GiB activations at "
          f"{micro} x {seq_len}, {precision}{', checkpointed' if checkpointing else ''} = "
          f"{(states + copies + acts) / GIB:.1f} GiB")
    return states, copies, acts


def memory(args: argparse.Namespace, name: str, device: torch.device, precision: str) -> None:
    """The memory preset: parameters counted on ``meta``; the step measured where it fits."""
    cfg = preset_config(name)
    _, micro, seq_len = SHAPES.get(name, (1, 1, 2048))
    states, copies, acts = print_plan(name, cfg, micro, seq_len, precision,
                                      args.activation_checkpointing)
    planned = states + copies + acts
    if device.type != "cuda":
        print(f"  measured: not on a CPU; on a GPU with at least {planned / GIB:.0f} GiB free "
              f"this step is measured, on a smaller one FSDP shards the states")
        return
    gpu = torch.cuda.get_device_name(device)
    free, total = torch.cuda.mem_get_info(device)
    fitted = planned < 0.95 * free
    if fitted:
        try:
            peak, seconds = measure_step(args, cfg, device, precision, micro, seq_len)
        except torch.cuda.OutOfMemoryError:
            fitted = False
            print(f"  measured on {gpu}: out of memory although planned to fit")
    if fitted:
        print(f"  measured on {gpu}: peak {peak / GIB:.1f} GiB allocated (measured / planned "
              f"{peak / planned:.2f}); a step of {micro * seq_len} tokens: {seconds:.2f} s")
        return
    gc.collect()  # what the failed step held
    torch.cuda.empty_cache()
    room = 0.9 * total / GIB - (copies + acts) / GIB
    shards = math.ceil(states / GIB / room) if room > 0 else 0
    print(f"  does not fit one {gpu} ({total / GIB:.0f} GiB): FSDP over "
          f"{shards or 'more'} such GPUs (the states sharded; copies and activations on each)")


def main() -> None:
    """Parse, compare the loops preset by preset, then the memory preset; exit 1 when the
    two loops disagree on the losses."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="", help="comma-separated; default 125m,1b on CUDA, "
                                                 "tiny,small on a CPU")
    ap.add_argument("--memory-preset", default="7b", help="its step's memory; '' to skip")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="bf16, fp32 or auto")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (0: preset's)")
    ap.add_argument("--micro", type=int, default=0, help="sequences per micro-batch")
    ap.add_argument("--seq-len", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20, help="steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="steps before measuring")
    ap.add_argument("--reps", type=int, default=3, help="measurements of each loop")
    ap.add_argument("--compile", action="store_true", help="torch.compile both loops")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU")
    ap.add_argument("--threads", type=int, default=0)
    args = parse(ap, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.steps, args.reps, args.warmup) < 1:
        raise SystemExit("bench/gpu.py: --steps, --reps and --warmup must be >= 1")
    try:
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"bench/gpu.py: {e}") from None
    presets = [p for p in (args.preset or ("125m,1b" if device.type == "cuda" else
                                           "tiny,small")).split(",") if p]
    peak, source = peak_flops(args, device, precision)
    where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
             if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads")
    print(f"device: {where}; torch {torch.__version__}; MFU against: {source}")
    same = [report(p, compare(args, p, device, precision), args, peak, precision)
            for p in presets]
    if args.memory_preset:
        memory(args, args.memory_preset, device, precision)
    if not all(same):
        sys.exit(1)


if __name__ == "__main__":
    main()
