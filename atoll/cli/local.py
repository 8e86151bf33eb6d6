"""The commands that work on this machine alone: ``demo``, ``prepare``, ``simulate``,
``report``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from atoll.cli.fail import fail

if TYPE_CHECKING:
    from atoll.app.run_config import RunConfig


def cmd_prepare(args: argparse.Namespace) -> int:
    """``atoll prepare``: input files (or the demo's domains) into a prepared data folder."""
    from atoll.app.progress import Progress
    from atoll.data.demo import build_demo_data
    from atoll.data.prepare import PrepareOptions, prepare

    if args.demo:
        build_demo_data(args.out, seq_len=args.seq_len)
        print(f"demo data prepared under {args.out}")
        return 0
    if not args.inputs:
        return fail("prepare: name at least one input file or directory")
    opts = PrepareOptions(seq_len=args.seq_len, val_fraction=args.val_fraction,
                          text_field=args.text_field, tokenizer=args.tokenizer or "",
                          contributor=args.contributor or "", workers=args.workers)
    print(f"preparing {len(args.inputs)} input(s) into {args.out}")
    bar = Progress(sys.stdout)  # errors alone go to stderr: one line
    m = prepare(args.inputs, args.out, opts, log=bar.log, progress=bar.update)
    tokens = sum(s["tokens"] for s in m["sources"])
    print(f"done: {len(m['sources'])} source(s), {tokens:,} tokens, "
          f"{m['splits']['train']['rows']} train / {m['splits']['val']['rows']} val rows "
          f"of {m['seq_len']} tokens")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """``atoll simulate``: a federation run on the local engine, new or resumed."""
    from atoll.app.progress import Progress
    from atoll.app.run_config import load_run_config
    from atoll.app.simulate import simulate
    from atoll.cli.summary import print_summary

    if args.resume:
        out = Path(args.resume)
        if args.config:
            return fail("simulate: give a CONFIG or --resume DIR, not both")
        cfg = load_run_config(out / "config.toml", args.overrides)
    else:
        if not args.config:
            return fail("simulate: name a CONFIG.toml (or --resume DIR)")
        cfg = load_run_config(args.config, args.overrides)
        out = Path(args.out or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    progress = Progress(title=f"atoll simulate {cfg.name}")
    run = simulate(cfg, out, resume=bool(args.resume), progress=progress)
    print_summary(run)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``atoll demo``: the bundled four-domain federation, from its data to a sample."""
    from atoll.app.progress import Progress
    from atoll.app.run_config import load_run_config
    from atoll.app.simulate import simulate
    from atoll.cli.summary import print_summary
    from atoll.data.demo import build_demo_data
    from atoll.model import generate_sample

    out = Path(args.out)
    if out.exists() and (out / "run.json").exists():
        shutil.rmtree(out)  # a previous demo run: the demo always starts afresh
    cache = Path(os.environ.get("ATOLL_CACHE", Path.home() / ".cache" / "atoll"))
    started = time.perf_counter()
    data = build_demo_data(cache / "demo-data")
    with resources.as_file(resources.files("atoll") / "configs" / "demo.toml") as path:
        cfg = load_run_config(path, args.overrides, base=cache / "demo-data")
    print(f"atoll demo: {len(cfg.sites)} sites ({', '.join(data)}), each with its own domain; "
          f"model '{cfg.model.preset}', {cfg.federation.rounds} rounds of "
          f"{cfg.federation.steps_per_round} steps -> {out}")
    print_cost(cfg)
    run = simulate(cfg, out, progress=Progress(title="atoll demo"))
    print_summary(run)
    prompt, model, via = "The ", run.model, ""
    if run.grid is not None:  # the prompt runs through the path its first tokens route to
        from atoll.app.paths_export import load_for_prompt
        from atoll.paths.grid import path_name

        model, _, path = load_for_prompt(out / "model", prompt)
        via = f" (path {path_name(path)})"
    sample = generate_sample(model, run.tokenizer, prompt, seed=cfg.seed)
    print(f"\nsample from the federated model{via}: {prompt}{sample!r}")
    print(f"\ndone in {time.perf_counter() - started:.0f}s; open {out / 'report.html'}")
    return 0


def print_cost(cfg: RunConfig) -> None:
    """The bare step time measured here, and what the run will cost in such steps."""
    import torch

    from atoll.app.step_clock import bare_step_seconds, run_cost_in_steps
    from atoll.tokenizer import load_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = cfg.model.build(load_tokenizer(cfg.tokenizer), seed=cfg.seed)
    step = bare_step_seconds(model, cfg.inner.batch_size, cfg.data.seq_len)
    cost = run_cost_in_steps(cfg)
    print(f"a bare training step here (batch {cfg.inner.batch_size} x {cfg.data.seq_len}, "
          f"{torch.get_num_threads()} threads): {step:.3f}s; the run costs about {cost:,.0f} "
          f"such steps: estimated {cost * step:.0f}s")


def cmd_report(args: argparse.Namespace) -> int:
    """``atoll report``: (re)write a run folder's report.html from its metrics."""
    from atoll.app.html_report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``atoll export``: a clean copy of a finished run's model, with its model card."""
    from atoll.app.publish import export_run

    try:
        out = export_run(args.run_dir, args.out, args.dtype)
    except (ValueError, FileNotFoundError) as e:
        return fail(f"export: {e}")
    what = "every path a Hugging Face model, and the router" if (out / "paths.json").exists() \
        else f"AutoModelForCausalLM.from_pretrained; model card {out / 'README.md'}"
    print(f"wrote {out} ({what})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``, ``prepare``, ``simulate``, ``report`` and ``export`` to the command
    line."""
    d = sub.add_parser("demo", help="run the demo federation (4 sites, tiny model) on this CPU")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("overrides", nargs="*", help="config overrides, e.g. federation.rounds=4")
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("prepare", help="turn text/JSONL/Parquet files into token shards")
    pr.add_argument("inputs", nargs="*", help="files or directories")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    pr.add_argument("--val-fraction", type=float, default=0.05)
    pr.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    pr.add_argument("--tokenizer", help="a local Hugging Face tokenizer directory")
    pr.add_argument("--workers", type=int, default=0,
                    help="tokenising processes (default: min(4, CPUs) for a Hugging Face "
                         "tokenizer on 64 MiB of input or more, else 1)")
    pr.add_argument("--contributor", help="contributor id recorded in the manifest")
    pr.add_argument("--demo", action="store_true", help="prepare the four demo domains")
    pr.set_defaults(func=cmd_prepare)

    s = sub.add_parser("simulate", help="run a federation described by CONFIG.toml locally")
    s.add_argument("config", nargs="?", help="run config (TOML)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. inner.lr=0.001")
    s.add_argument("--out", help="run folder (default: runs/<name>-<time>)")
    s.add_argument("--resume", metavar="DIR", help="continue a stopped run in DIR")
    s.set_defaults(func=cmd_simulate)

    e = sub.add_parser("export", help="a clean copy of a finished run's model, to publish")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    e.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="(re)write report.html of a run folder")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)
