"""The commands of a federation across machines: ``keys``, ``coordinator``, ``site``,
``slowlink`` and ``status``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from atoll.cli.fail import fail
from atoll.federation.fault_kinds import FAULTS, check_fault

INSECURE_HELP = "no TLS, no authentication (loopback development only)"


def cmd_keys(args: argparse.Namespace) -> int:
    """``atoll keys``: the federation's CA, coordinator certificate and site keys."""
    from atoll.deploy.keys import add_site_key, make_keys, make_site_key

    if args.site:  # on the site's machine: its own key, never shipped anywhere
        public = make_site_key(args.dir, args.site)
        print(f"{Path(args.dir) / args.site}: this site's private key (keep it here)")
        print(f"send {public} to the coordinator's operator, who runs: atoll keys DIR "
              f"--add-site {public.name}\n{public.read_text().strip()}")
        return 0
    if args.add_site:
        name = add_site_key(args.dir, args.add_site)
        print(f"{args.dir}/sites/{name}.pub: site {name!r} registered at the next start "
              f"of atoll coordinator")
        return 0
    sites = [s for s in (args.sites or "").split(",") if s]
    hosts = [h for h in (args.hosts or "").split(",") if h]
    written = make_keys(args.dir, sites, hosts)
    print(f"{args.dir}: {', '.join(written) or 'nothing new'}")
    print("give each site ca.crt (the coordinator keeps ca.key and server.key); a site "
          "makes its own key with atoll keys DIR --site NAME")
    if sites:
        print("sites/NAME private keys were made here for trying things out: a site that "
              "uses one must be sent it; better, it makes its own")
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    """``atoll coordinator``: serve a new or resumed run to sites on other machines."""
    from atoll.app.follow import RunFollower
    from atoll.app.progress import Progress
    from atoll.app.run_config import load_run_config, prepare_deployed_run
    from atoll.app.run_folder import lock_run_folder
    from atoll.deploy.coordinator_host import CoordinatorOptions, serve_coordinator

    if bool(args.config) == bool(args.resume):
        return fail("coordinator: give a CONFIG.toml with --out DIR, or --resume DIR")
    out = Path(args.resume or args.out or "")
    if not args.resume and not args.out:
        return fail("coordinator: --out DIR is required")
    if not args.resume:
        out.mkdir(parents=True, exist_ok=True)
    if out.is_dir():  # before anything is written there; held until this process exits
        lock = lock_run_folder(out, name=".coordinator.lock")  # noqa: F841
    config = prepare_deployed_run(out, args.config or None, list(args.overrides),
                                  bool(args.resume))
    sites = [s.name for s in load_run_config(config, simulation=False).sites]
    opts = CoordinatorOptions(out=out, host=args.host, port=args.port,
                              keys=Path(args.keys) if args.keys else None,
                              insecure=args.insecure, resume=bool(args.resume),
                              public_address=args.public_address or "", sites=sites)
    progress = Progress(sys.stdout, title=f"atoll coordinator {out}")
    if args.dashboard is not None:
        from atoll.app.dashboard import serve_in_background

        page = serve_in_background(out, port=args.dashboard)
        progress.log(f"dashboard: http://127.0.0.1:{page.server_port}/")
    try:
        return serve_coordinator(opts, config, log=progress.log, on_poll=RunFollower(
            out, log=progress.log, status=progress.status).poll)
    finally:
        progress.close()


def _fault_spec(text: str) -> str:
    """``--fault``'s value, once every kind it names is known."""
    try:
        check_fault(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def cmd_site(args: argparse.Namespace) -> int:
    """``atoll site``: join a coordinator with this machine's data until the run ends."""
    from atoll.deploy.site_host import SiteOptions, serve_site

    opts = SiteOptions(coordinator=args.coordinator, data=Path(args.data), name=args.name or "",
                       keys=Path(args.keys) if args.keys else None,
                       key=Path(args.key) if args.key else None,
                       ca=Path(args.ca) if args.ca else None, insecure=args.insecure,
                       state=Path(args.state) if args.state else None, threads=args.threads,
                       device=args.device, nproc=args.nproc, shard=args.shard,
                       fault=args.fault or "", max_wait_s=args.max_wait)
    return serve_site(opts)


def cmd_status(args: argparse.Namespace) -> int:
    """``atoll status``: where a run stands, read from its status.json."""
    from atoll.app.status import format_status, read_status

    print(format_status(read_status(args.run_dir)))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """``atoll dashboard``: serve a run folder's live page until Ctrl-C."""
    from atoll.app.dashboard import make_server

    if not Path(args.run_dir).is_dir():
        return fail(f"dashboard: {args.run_dir} is not a run folder")
    try:
        server = make_server(args.run_dir, args.host, args.port)
    except OSError as e:
        return fail(f"dashboard: cannot listen on {args.host}:{args.port}: {e.strerror}")
    print(f"dashboard of {args.run_dir}: http://{args.host}:{server.server_port}/ "
          f"(read-only; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_slowlink(args: argparse.Namespace) -> int:
    """``atoll slowlink``: a TCP proxy that makes a link slow and lossy, until Ctrl-C."""
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``keys``, ``coordinator``, ``site``, ``slowlink`` and ``status`` to the command
    line."""
    k = sub.add_parser("keys", help="create the TLS certificates and site keys of a federation")
    k.add_argument("dir", help="keys directory (created; existing keys are kept)")
    k.add_argument("--sites", help="comma-separated site names to make keys for")
    k.add_argument("--hosts", help="comma-separated names/IPs the coordinator is reached at")
    k.add_argument("--site", metavar="NAME",
                   help="on a site's machine: make only this site's own key pair in DIR")
    k.add_argument("--add-site", metavar="NAME.pub",
                   help="on the coordinator: register a public key a site sent")
    k.set_defaults(func=cmd_keys)

    _add_coordinator(sub)
    _add_site(sub)

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

    db = sub.add_parser("dashboard", help="a live web page of a run folder (read-only)")
    db.add_argument("run_dir")
    db.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1: this "
                    "machine only)")
    db.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any)")
    db.set_defaults(func=cmd_dashboard)


def _add_coordinator(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("coordinator", help="run a federation's coordinator (Flower SuperLink)")
    c.add_argument("config", nargs="?", help="run config (TOML)")
    c.add_argument("overrides", nargs="*", help="key=value overrides")
    c.add_argument("--out", help="run folder")
    c.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    c.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    c.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    c.add_argument("--keys", help="keys directory made by `atoll keys`")
    c.add_argument("--public-address", help="HOST:PORT sites use to reach this machine")
    c.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    c.add_argument("--dashboard", type=int, nargs="?", const=8765, default=None, metavar="PORT",
                   help="also serve the live page on 127.0.0.1:PORT (default 8765)")
    c.set_defaults(func=cmd_coordinator)


def _add_site(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("site", help="join a federation as a site (Flower SuperNode)")
    t.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    t.add_argument("--data", required=True, help="this site's data, made by atoll prepare")
    t.add_argument("--name", help="site name (default: the data directory's name)")
    t.add_argument("--keys", help="keys directory (uses ca.crt and sites/NAME)")
    t.add_argument("--key", help="this site's private key file")
    t.add_argument("--ca", help="the federation's ca.crt")
    t.add_argument("--state", help="where the site keeps its state (default ./atoll-state/NAME)")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    t.add_argument("--device", default="auto",
                   help="where to train: auto (CUDA when present), cpu, cuda or cuda:N")
    t.add_argument("--nproc", type=int, default=1,
                   help="processes that train this site together, one per GPU (default 1; "
                        "under torchrun its own count holds)")
    t.add_argument("--shard", action="store_true",
                   help="with several processes: shard weights and AdamW state (FSDP2) "
                        "instead of replicating them (DDP)")
    t.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    t.add_argument("--max-wait", type=float, default=0.0,
                   help="give up after this many seconds without a connection (0 = never)")
    t.add_argument("--fault", type=_fault_spec, metavar="KIND[,KIND...]",
                   help="drills: make this site misbehave, one kind a round in turn ("
                        f"{', '.join(f for f in FAULTS if f)}; see the README)")
    t.set_defaults(func=cmd_site)
