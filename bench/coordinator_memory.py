"""The coordinator's peak memory in a round, measured against the peak it states.

A model preset is built for real on CPU (its initialisation skipped: only the sizes
matter), handed to a :class:`~atoll.federation.coordinator.Coordinator`, and taken through
a warm-up round of one site (the outer momentum then exists) and a round of ``N`` sites
reporting updates of the full model, closed with the outer step. Each update is made
straight in its wire form (random codes and scales from a seeded generator, one model
tensor at a time) rather than by a site training: the path measured is the coordinator's
own, ``accept`` and ``close``. Each ``N`` runs in a process of its own, whose peak resident
memory less what it held before the model existed is the figure; the baseline is the
stated peak (:func:`atoll.federation.memory.coordinator_peak`).

The peak is Linux's high-water mark of the process's memory, reset once the imports are
done (:mod:`peak_memory`).

    python bench/coordinator_memory.py [--preset 1b] [--sites 2,8] [--codec int8/64] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
from peak_memory import peak_from_here, peak_since
from smoke import parse

GiB = 1 << 30


def wire_update(shapes: dict[str, torch.Size], codec: str, seed: int) -> dict[str, torch.Tensor]:
    """An update of ``shapes`` in ``codec``'s wire form: random codes and scales (or values),
    filled tensor by tensor from a generator seeded with ``seed``."""
    from atoll.federation.codecs import parse_spec
    from atoll.federation.wire_parts import packed, parts_of

    cfg = parse_spec(codec)
    g = torch.Generator().manual_seed(seed)
    layout = {n: parts_of(math.prod(shapes[n]), cfg.kind, cfg.block, cfg.topk, cfg.select)
              for n in sorted(shapes)}
    if not packed(cfg.kind, cfg.topk):  # one wire tensor per model tensor
        return {f"{n}::val": _fill(torch.empty(shapes[n], dtype=dt), "val", g)
                for n in layout for dt, _ in layout[n].values()}
    kinds = {p: dt for parts in layout.values() for p, (dt, _) in parts.items()}
    wire = {p: torch.empty(sum(math.prod(layout[n][p][1]) for n in layout), dtype=dt)
            for p, dt in kinds.items()}
    at = dict.fromkeys(wire, 0)
    for n in layout:
        for p, (_, shape) in layout[n].items():
            _fill(wire[p][at[p] : at[p] + math.prod(shape)], p, g)
            at[p] += math.prod(shape)
    return {f"::{p}": t for p, t in wire.items()}


def _fill(piece: torch.Tensor, part: str, g: torch.Generator) -> torch.Tensor:
    """Random wire values of one part, in place: positive scales, small values, any codes."""
    if part == "scale":
        return piece.uniform_(0.5e-4, 1.5e-4, generator=g)
    if piece.dtype.is_floating_point:
        return piece.normal_(0.0, 1e-3, generator=g)
    if piece.dtype == torch.int8:
        return piece.random_(-127, 128, generator=g)
    return piece.random_(0, 256, generator=g)  # packed codes, top-k places


def child(preset: str, vocab: int, n_sites: int, codec: str) -> dict:
    """One measurement, in this process: the figures as a dict."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from atoll.federation.codecs import parse_spec
    from atoll.federation.coordinator import Coordinator
    from atoll.federation.memory import coordinator_peak
    from atoll.federation.protocol import SiteUpdate
    from atoll.federation.settings import CoordinatorConfig, FederationConfig
    from atoll.model import PRESETS
    from atoll.util.heap import return_large_frees_to_os

    return_large_frees_to_os()  # as the coordinator's ServerApp does
    with no_init_weights():  # the code a model needs, loaded before the baseline is taken
        AutoModelForCausalLM.from_config(PRESETS["tiny"](256))
    baseline = peak_from_here()
    t0 = time.perf_counter()
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(PRESETS[preset](vocab), dtype=torch.float32)
    for w in model.parameters():  # skipped init leaves garbage (NaN) that the outer step refuses
        w.detach().zero_()
    cfg = CoordinatorConfig(run_id="mem", model_config={}, total_steps=100,
                            federation=FederationConfig(steps_per_round=1),
                            up=parse_spec(codec))
    coord = Coordinator(dict(model.named_parameters()), cfg)
    del model
    shapes = {n: w.shape for n, w in coord.weights.items()}
    built = time.perf_counter() - t0
    rss, seconds, seed, update_bytes = [], [], 0, 0
    for r, n in ((1, 1), (2, n_sites)):
        sites = [f"site{i}" for i in range(n)]
        coord.open_round(sites)
        for s in sites:
            seed += 1
            t = time.perf_counter()
            update = SiteUpdate(run_id="mem", round=r, site=s, tokens=1000, steps=1,
                                train_loss=1.0, seconds=1.0, compute_seconds=1.0,
                                codec=cfg.up.spec, delta=wire_update(shapes, cfg.up.spec, seed))
            update_bytes = update_bytes or sum(t.numel() * t.element_size()
                                               for t in update.delta.values())  # all alike
            reason = coord.accept(update)
            del update
            if reason is not None:
                raise SystemExit(f"update refused: {reason}")
            seconds.append(time.perf_counter() - t)
            rss.append(peak_since(baseline))
        if not coord.close().applied:
            raise SystemExit("the outer step was not taken")
        rss.append(peak_since(baseline))
    stated = coordinator_peak(shapes, cfg.outer, cfg.up, cfg.down)
    return {"preset": preset, "sites": n_sites, "codec": cfg.up.spec,
            "params": sum(math.prod(s) for s in shapes.values()),
            "largest": max(math.prod(s) for s in shapes.values()), "update_bytes": update_bytes,
            "stated": stated.total, "parts": vars(stated), "peak": max(rss),
            "after_first_site": rss[2], "after_last_site": rss[-2], "after_close": rss[-1],
            "after_each_site": rss[2:-1],
            "build_s": built, "s_per_update": sum(seconds) / len(seconds)}


def measure(preset: str, vocab: int, n_sites: int, codec: str) -> dict:
    """:func:`child` in a fresh process (its memory is its own)."""
    cmd = [sys.executable, __file__, "--child", "--preset", preset, "--vocab", str(vocab),
           "--sites", str(n_sites), "--codec", codec]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"measuring {n_sites} sites failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--sites", default="2,8", help="site counts, comma-separated")
    ap.add_argument("--codec", default="int8/64", help="the uplink codec")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parse(ap, {"preset": "tiny", "sites": "3"})
    if args.child:
        print(json.dumps(child(args.preset, args.vocab, int(args.sites), args.codec)))
        return
    print(f"{'preset':<7}{'codec':<9}{'sites':>6}{'params':>10}{'peak RSS':>11}{'stated':>9}"
          f"{'measured / stated':>19}{'bytes/param':>13}{'stated B/param':>16}{'s/update':>10}")
    for n in (int(x) for x in args.sites.split(",")):
        m = measure(args.preset, args.vocab, n, args.codec)
        print(f"{m['preset']:<7}{m['codec']:<9}{n:>6}{m['params'] / 1e9:>9.3f}B"
              f"{m['peak'] / GiB:>9.2f}Gi{m['stated'] / GiB:>7.2f}Gi"
              f"{m['peak'] / m['stated']:>19.3f}{m['peak'] / m['params']:>13.2f}"
              f"{m['stated'] / m['params']:>16.2f}{m['s_per_update']:>10.1f}")


if __name__ == "__main__":
    main()
