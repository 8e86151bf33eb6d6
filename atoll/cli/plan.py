"""``atoll plan``: what a federation will cost, from a run config or from flags alone.

One column per model and uplink named (``--model 1b,7b,70b --uplink 100mbit,1gbit``); a
flag given overrides what the config says. See :mod:`atoll.capacity.plan` for the model of
a round and what each figure assumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

DEFAULTS = {"sites": 8, "gpus_per_site": 8, "gpu": "h100", "batch_size": 16,
            "grad_accum": 8, "seq_len": 2048, "steps_per_round": 500}
"""Without a config: eight sites of 8 GPUs, steps of 128 x 2048 tokens (micro-batches of
two sequences a GPU), H = 500 inner steps a round (DiLoCo's)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``plan`` to the command line."""
    p = sub.add_parser("plan", help="what a federation will cost: memory, speed, bytes, time")
    p.add_argument("config", nargs="?", help="run config (TOML) to plan; flags override it")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--model", help="preset(s) or config.json / model directory, comma-separated")
    p.add_argument("--vocab", type=int, help="vocabulary of a preset (default: the byte-level "
                   "tokenizer's for tiny and small, 32000 for the rest)")
    p.add_argument("--sites", type=int)
    p.add_argument("--gpus-per-site", type=int)
    p.add_argument("--gpu", help="h100, h200, a100, a100-40gb, l40s, a10, rtx4090 or cpu")
    p.add_argument("--tokens-per-second", type=float, help="measured tokens/s of one site")
    p.add_argument("--mfu", type=float, help="MFU to assume instead of the GPU table's")
    p.add_argument("--batch-size", type=int, help="sequences per step of a site")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--steps-per-round", type=int, help="inner steps per round (H)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    p.add_argument("--activation-checkpointing", action="store_true", default=None)
    p.add_argument("--up", help="uplink codec, e.g. fp32, bf16, int4/64+top0.1")
    p.add_argument("--down", help="downlink codec, e.g. fp32, bf16")
    p.add_argument("--fragments", type=int, help="streaming: fragments, one synced a round")
    p.add_argument("--overlap", action="store_true", default=None,
                   help="streaming with overlap: transfers run behind compute")
    p.add_argument("--uplink", help="each site's link, e.g. 100mbit or 100mbit,1gbit")
    p.add_argument("--downlink", help="coordinator -> site rate (default: as --uplink)")
    p.add_argument("--latency", default="0ms", help="one way, e.g. 80ms")
    p.add_argument("--coordinator-link", default="0", help="the coordinator's own link")
    p.add_argument("--tokens", type=float, help="token budget (default 20 per parameter)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    """``atoll plan``: print the planner's table."""
    from atoll.capacity.plan import build, model_shapes
    from atoll.capacity.table import render

    shapes: dict[str, dict] = {}  # one meta-device build per model, however many links
    plans = []
    for cfg in plan_configs(args):
        if cfg.model_name not in shapes:
            shapes[cfg.model_name] = model_shapes(cfg.model)
        plans.append(build(cfg, shapes[cfg.model_name]))
    print(render(plans))
    return 0


def plan_configs(args: argparse.Namespace) -> list:
    """One :class:`~atoll.capacity.plan.PlanConfig` per model and uplink named."""
    from atoll.capacity.network import parse_latency, parse_rate
    from atoll.capacity.plan import PlanConfig

    base = _from_run_config(args) if args.config else {
        "model": None, "model_name": "", **DEFAULTS}
    base.update(_flags(args))
    models = [(base.pop("model"), base.pop("model_name"))]
    if args.model:
        models = [(_model(m.strip(), args.vocab), m.strip()) for m in args.model.split(",")]
    if models[0][0] is None:
        raise ValueError("plan: give a run config or --model")
    rates = [parse_rate(r) for r in (args.uplink or "100mbit").split(",")]
    links = {"downlink": parse_rate(args.downlink) if args.downlink else 0.0,
             "latency": parse_latency(args.latency),
             "coordinator_link": parse_rate(args.coordinator_link)}
    return [PlanConfig(model=m, model_name=name, uplink=rate, **links, **base)
            for m, name in models for rate in rates]


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The plan settings given as flags (codecs parsed)."""
    from atoll.federation.codecs import parse_spec
    from atoll.util.errors import WireError

    out: dict[str, Any] = {}
    for key in ("sites", "gpus_per_site", "gpu", "tokens_per_second", "mfu", "batch_size",
                "grad_accum", "seq_len", "steps_per_round", "precision",
                "activation_checkpointing", "fragments", "overlap"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.tokens is not None:
        out["token_budget"] = args.tokens
    for key in ("up", "down"):
        if getattr(args, key):
            try:
                out[key] = parse_spec(getattr(args, key))
            except WireError:
                raise ValueError(f"--{key} {getattr(args, key)!r}: not a codec (fp32, bf16, "
                                 f"int8/64, int4/64+top0.1, ...)") from None
    if "gpu" in out:
        out["gpu"] = out["gpu"].lower()
    return out


def _model(name: str, vocab: int | None) -> Any:
    """A preset's config, or a ``config.json`` / model directory's."""
    from transformers import AutoConfig

    from atoll.model import PRESETS
    from atoll.tokenizer import byte_tokenizer

    if name in PRESETS:
        small = name in ("tiny", "small")
        return PRESETS[name](vocab or (len(byte_tokenizer()) if small else 32000))
    p = Path(name)
    if not p.exists():
        raise ValueError(f"--model {name!r}: not a preset ({', '.join(PRESETS)}) nor a "
                         f"config.json or model directory")
    if p.is_file():
        return AutoConfig.for_model(**json.loads(p.read_text()))
    return AutoConfig.from_pretrained(p)


def _from_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The plan settings a run config implies (its model, sites, batch, codecs, streaming)."""
    from atoll.app.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides, simulation=False)
    if not cfg.federation.steps_per_round:
        raise ValueError(f"{args.config}: plan needs federation.steps_per_round (a time "
                         f"budget is planned by its steps)")
    return run_settings(cfg)


def run_settings(cfg: Any) -> dict[str, Any]:
    """The :class:`~atoll.capacity.plan.PlanConfig` fields a
    :class:`~atoll.app.run_config.RunConfig` implies."""
    from atoll.tokenizer import load_tokenizer
    from atoll.train.device import resolve_device

    f, inner = cfg.federation, cfg.inner
    sites = f.sites_per_round or len(cfg.sites) or 1
    on_cpu = resolve_device(cfg.device).type == "cpu"
    return {"model": cfg.model.hf_config(load_tokenizer(cfg.tokenizer)),
            "model_name": cfg.model.preset if not cfg.model.path else Path(cfg.model.path).name,
            "sites": sites, "gpus_per_site": 1, "gpu": "cpu" if on_cpu else "h100",
            "batch_size": inner.batch_size, "grad_accum": inner.grad_accum,
            "seq_len": cfg.data.seq_len, "steps_per_round": f.steps_per_round,
            "precision": inner.precision,
            "activation_checkpointing": inner.activation_checkpointing,
            "up": dataclasses.replace(cfg.comm.up), "down": dataclasses.replace(cfg.comm.down),
            "fragments": f.fragments, "overlap": f.overlap_steps > 0}
