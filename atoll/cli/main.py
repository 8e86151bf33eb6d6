"""The ``atoll`` command line: a thin layer over the library.

Every command turns bad input into one line on stderr (``error: <where>: <what>``) and a
non-zero exit status.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

from atoll.cli.contrib import add_parsers as add_contributor_commands
from atoll.config import ConfigError
from atoll.federation.fault_kinds import FAULTS

EXIT_BAD_INPUT = 2


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_prepare(args: argparse.Namespace) -> int:
    from atoll.data.demo import build_demo_data
    from atoll.data.prepare import PrepareOptions, prepare

    if args.demo:
        build_demo_data(args.out, seq_len=args.seq_len)
        print(f"demo data prepared under {args.out}")
        return 0
    if not args.inputs:
        return _fail("prepare: name at least one input file or directory")
    opts = PrepareOptions(seq_len=args.seq_len, val_fraction=args.val_fraction,
                          text_field=args.text_field, tokenizer=args.tokenizer or "",
                          contributor=args.contributor or "")
    print(f"preparing {len(args.inputs)} input(s) into {args.out}")
    m = prepare(args.inputs, args.out, opts)
    tokens = sum(s["tokens"] for s in m["sources"])
    print(f"done: {len(m['sources'])} source(s), {tokens:,} tokens, "
          f"{m['splits']['train']['rows']} train / {m['splits']['val']['rows']} val rows "
          f"of {m['seq_len']} tokens")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from atoll.app.progress import Progress
    from atoll.app.run_config import load_run_config
    from atoll.app.simulate import simulate

    if args.resume:
        out = Path(args.resume)
        if args.config:
            return _fail("simulate: give a CONFIG or --resume DIR, not both")
        cfg = load_run_config(out / "config.toml", args.overrides)
    else:
        if not args.config:
            return _fail("simulate: name a CONFIG.toml (or --resume DIR)")
        cfg = load_run_config(args.config, args.overrides)
        out = Path(args.out or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run = simulate(cfg, out, resume=bool(args.resume), progress=Progress())
    _print_summary(run)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from atoll.app.progress import Progress
    from atoll.app.run_config import load_run_config
    from atoll.app.simulate import simulate
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
    run = simulate(cfg, out, progress=Progress())
    _print_summary(run)
    prompt = "The "
    sample = generate_sample(run.model, run.tokenizer, prompt, seed=cfg.seed)
    print(f"\nsample from the federated model: {prompt}{sample!r}")
    print(f"\ndone in {time.perf_counter() - started:.0f}s; open {out / 'report.html'}")
    return 0


def _print_summary(run: object) -> None:
    from atoll.app.metrics import FEDERATION

    final = run.final_losses()
    fed = final.get(FEDERATION, {})
    others = [k for k in final if k != FEDERATION]
    print("\nfinal validation loss (nats/token) per domain")
    print(f"  {'domain':<14}{'federation':>12}" + "".join(f"{k:>26}" for k in others))
    for d in sorted(fed):
        row = f"  {d:<14}{fed[d]:>12.4f}"
        for k in others:
            row += f"{final[k].get(d, float('nan')):>26.4f}"
        print(row)
    if fed:
        mean = sum(fed.values()) / len(fed)
        row = f"  {'mean':<14}{mean:>12.4f}"
        for k in others:
            m = sum(final[k].values()) / len(final[k])
            row += f"{m:>18.4f} ({(mean / m - 1) * 100:+.1f}%)"
        print(row)
    from atoll.app.books import LEDGER
    from atoll.ledger.chain import read_entries
    from atoll.ledger.credit import shares

    if (run.out / LEDGER).exists():
        table = shares(read_entries(run.out / LEDGER))
        print("\nshare of the model (ledger: " + str(run.out / LEDGER) + ")")
        print("  " + ", ".join(f"{s.contributor} {s.share:.1%}" for s in table))
    print(f"\nmodel: {run.out / 'model'} (AutoModelForCausalLM.from_pretrained)")
    print(f"report: {run.out / 'report.html'}")


def cmd_report(args: argparse.Namespace) -> int:
    from atoll.app.html_report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from atoll.deploy.keys import make_keys

    sites = [s for s in (args.sites or "").split(",") if s]
    hosts = [h for h in (args.hosts or "").split(",") if h]
    written = make_keys(args.dir, sites, hosts)
    print(f"{args.dir}: {', '.join(written) or 'nothing new'}")
    print("give the coordinator the whole directory; give each site ca.crt and its own "
          "sites/NAME (keep ca.key and the private keys secret)")
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from atoll.app.follow import RunFollower
    from atoll.app.run_config import prepare_deployed_run
    from atoll.deploy.coordinator_host import CoordinatorOptions, serve_coordinator

    if bool(args.config) == bool(args.resume):
        return _fail("coordinator: give a CONFIG.toml with --out DIR, or --resume DIR")
    out = Path(args.resume or args.out or "")
    if not args.resume and not args.out:
        return _fail("coordinator: --out DIR is required")
    config = prepare_deployed_run(out, args.config or None, list(args.overrides),
                                  bool(args.resume))
    opts = CoordinatorOptions(out=out, host=args.host, port=args.port,
                              keys=Path(args.keys) if args.keys else None,
                              insecure=args.insecure, resume=bool(args.resume),
                              public_address=args.public_address or "")
    return serve_coordinator(opts, config, on_poll=RunFollower(out).poll)


def cmd_site(args: argparse.Namespace) -> int:
    from atoll.deploy.site_host import SiteOptions, serve_site

    opts = SiteOptions(coordinator=args.coordinator, data=Path(args.data), name=args.name or "",
                       keys=Path(args.keys) if args.keys else None,
                       key=Path(args.key) if args.key else None,
                       ca=Path(args.ca) if args.ca else None, insecure=args.insecure,
                       state=Path(args.state) if args.state else None, threads=args.threads,
                       fault=args.fault or "", max_wait_s=args.max_wait)
    return serve_site(opts)


def cmd_status(args: argparse.Namespace) -> int:
    from atoll.app.status import format_status, read_status

    print(format_status(read_status(args.run_dir)))
    return 0


def cmd_slowlink(args: argparse.Namespace) -> int:
    from atoll.deploy.slowlink import LinkConfig, SlowLink

    def address(text: str) -> tuple[str, int]:
        host, _, port = text.rpartition(":")
        return host or "127.0.0.1", int(port)

    cfg = LinkConfig(mbit=args.mbit, latency_ms=args.latency_ms, loss=args.loss)
    link = SlowLink(address(args.listen), address(args.to), cfg).start()
    print(f"slow link {args.listen} -> {args.to}: {args.mbit or 'unlimited'} Mbit/s, "
          f"{args.latency_ms} ms each way, {args.loss:.1%} loss. Ctrl-C stops.")
    try:
        while True:
            time.sleep(10)
            st = link.stats
            print(f"  {st.connections} connections, {st.bytes / 1e6:.1f} MB, "
                  f"{st.lost} of {st.segments} segments resent")
    except KeyboardInterrupt:
        link.stop()
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atoll", description="Federated pre-training of language "
                                "models across islands of compute and data.")
    sub = p.add_subparsers(dest="command", required=True)

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
    pr.add_argument("--contributor", help="contributor id recorded in the manifest")
    pr.add_argument("--demo", action="store_true", help="prepare the four demo domains")
    pr.set_defaults(func=cmd_prepare)

    s = sub.add_parser("simulate", help="run a federation described by CONFIG.toml locally")
    s.add_argument("config", nargs="?", help="run config (TOML)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. inner.lr=0.001")
    s.add_argument("--out", help="run folder (default: runs/<name>-<time>)")
    s.add_argument("--resume", metavar="DIR", help="continue a stopped run in DIR")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("report", help="(re)write report.html of a run folder")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)

    k = sub.add_parser("keys", help="create the TLS certificates and site keys of a federation")
    k.add_argument("dir", help="keys directory (created; existing keys are kept)")
    k.add_argument("--sites", help="comma-separated site names to make keys for")
    k.add_argument("--hosts", help="comma-separated names/IPs the coordinator is reached at")
    k.set_defaults(func=cmd_keys)

    c = sub.add_parser("coordinator", help="run a federation's coordinator (Flower SuperLink)")
    c.add_argument("config", nargs="?", help="run config (TOML)")
    c.add_argument("overrides", nargs="*", help="key=value overrides")
    c.add_argument("--out", help="run folder")
    c.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    c.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    c.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    c.add_argument("--keys", help="keys directory made by `atoll keys`")
    c.add_argument("--public-address", help="HOST:PORT sites use to reach this machine")
    c.add_argument("--insecure", action="store_true",
                   help="no TLS, no authentication (loopback development only)")
    c.set_defaults(func=cmd_coordinator)

    t = sub.add_parser("site", help="join a federation as a site (Flower SuperNode)")
    t.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    t.add_argument("--data", required=True, help="this site's data, made by atoll prepare")
    t.add_argument("--name", help="site name (default: the data directory's name)")
    t.add_argument("--keys", help="keys directory (uses ca.crt and sites/NAME)")
    t.add_argument("--key", help="this site's private key file")
    t.add_argument("--ca", help="the federation's ca.crt")
    t.add_argument("--state", help="where the site keeps its state (default ./atoll-state/NAME)")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    t.add_argument("--insecure", action="store_true",
                   help="no TLS, no authentication (loopback development only)")
    t.add_argument("--max-wait", type=float, default=0.0,
                   help="give up after this many seconds without a connection (0 = never)")
    t.add_argument("--fault", choices=[f for f in FAULTS if f],
                   help="drills: make this site misbehave (see the README)")
    t.set_defaults(func=cmd_site)

    sl = sub.add_parser("slowlink", help="emulate a slow, lossy link (a TCP proxy)")
    sl.add_argument("--listen", required=True, help="HOST:PORT to accept connections on")
    sl.add_argument("--to", required=True, help="HOST:PORT to forward them to")
    sl.add_argument("--mbit", type=float, default=0.0, help="bandwidth, Mbit/s (0 = unlimited)")
    sl.add_argument("--latency-ms", type=float, default=0.0, help="one-way delay")
    sl.add_argument("--loss", type=float, default=0.0, help="segment loss probability")
    sl.set_defaults(func=cmd_slowlink)

    st = sub.add_parser("status", help="where a run stands: sites, round, reports, losses")
    st.add_argument("run_dir")
    st.set_defaults(func=cmd_status)
    add_contributor_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse leaves those over) or, with
    # --resume, land in the CONFIG slot.
    if any(not ("=" in e and not e.startswith("-")) for e in extra) or \
            (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith(".toml"):
        args.overrides = [args.config, *args.overrides]
        args.config = None
    from atoll.data.sources import DataError
    from atoll.util.storage import StateError

    try:
        return args.func(args)
    except (ConfigError, DataError, StateError, FileExistsError, FileNotFoundError,
            ValueError, RuntimeError, TimeoutError) as e:
        if os.environ.get("ATOLL_DEBUG"):
            raise
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted; resume with --resume (the last finished round is kept)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
