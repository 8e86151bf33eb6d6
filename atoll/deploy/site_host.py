"""``atoll site``: a SuperNode serving one site's data to a federation.

The site dials out to the coordinator (so NAT is fine), authenticates with its private key
over TLS, and trains whenever the coordinator sends a round. Its data never leaves this
machine; its state between rounds (inner optimizer, data cursor) lives in ``--state``. If
the coordinator goes away, the SuperNode keeps retrying and carries on when it is back.

With ``--nproc N`` (or under ``torchrun``) the site is several processes training together
(:mod:`atoll.deploy.site_ranks`); only rank 0 runs the SuperNode.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from atoll.data.reader import load_manifest
from atoll.deploy import app_guard
from atoll.deploy import flower_cli as fc
from atoll.engines.site_worker import SiteWorker

if TYPE_CHECKING:
    from atoll.federation.site import Site


@dataclass
class SiteOptions:
    """How ``atoll site`` joins a federation: the coordinator, this site's data, its keys."""

    coordinator: str
    """HOST:PORT of the coordinator's SuperLink."""
    data: Path
    name: str = ""
    """Site name (default: the data directory's name); must match its registered key."""
    keys: Path | None = None
    """A keys directory from ``atoll keys`` (uses ca.crt and sites/NAME)."""
    key: Path | None = None
    """This site's private key, when not in ``keys``."""
    ca: Path | None = None
    """The federation's CA certificate, when not in ``keys``."""
    insecure: bool = False
    state: Path | None = None
    """Where the site keeps its state (default: ./atoll-state/NAME)."""
    threads: int = 0
    device: str = "auto"
    """Where this site trains: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    nproc: int = 1
    """Processes that train this site together, one per GPU (under ``torchrun``: ignored,
    torchrun's own count holds)."""
    shard: bool = False
    """With several processes: shard weights, gradients and AdamW state (FSDP2) instead of
    replicating them (DDP)."""
    fault: str = ""
    """Testing only: make this site misbehave (see atoll.federation.faults)."""
    max_wait_s: float = 0.0
    """Give up after failing to connect (or being refused) for this long (0 = never)."""

    def resolve(self) -> None:
        """Fill in the defaults that follow from the others (name, state, key paths) and
        refuse a secure setup without a key and CA that exist, or a device this machine
        does not have."""
        from atoll.train.device import resolve_device

        resolve_device(self.device)
        if self.nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {self.nproc}")
        if self.fault and (self.nproc > 1 or _launched()):
            raise ValueError("--fault drills run as one process: leave out --nproc")
        self.name = self.name or self.data.resolve().name
        self.state = self.state or Path("atoll-state") / self.name
        if self.insecure:
            return
        if self.keys is not None:
            self.key = self.key or self.keys / "sites" / self.name
            self.ca = self.ca or self.keys / "ca.crt"
        if self.key is None or self.ca is None:
            raise ValueError("give --keys DIR (or --key and --ca), or --insecure for loopback "
                             "development")
        for p in (self.key, self.ca):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist")


def supernode_command(o: SiteOptions, port: int) -> list[str]:
    """The ``flower-supernode`` command line of site ``o``, its ClientApp on ``port``."""
    node_config = fc.write_toml(o.state / "node-config.toml", {
        "name": o.name, "data": str(o.data.resolve()), "state": str(o.state.resolve()),
        "worker": True})
    cmd = [fc.tool("flower-supernode"), "--superlink", o.coordinator, "--port", str(port),
           "--node-config", str(node_config.resolve())]
    if o.insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(o.ca.resolve()),
            "--auth-supernode-private-key", str(o.key.resolve())]


REFUSED = ("the coordinator refused this site's key (not registered there yet, or an earlier "
           "run of this site that vanished without saying goodbye is still counted online; "
           "Flower forgets it within 60s)")


def _why(log: Path, start: int = 0) -> str:
    """What the SuperNode's log (from byte ``start``) says about why it stopped."""
    text = log.read_bytes()[start:].decode(errors="replace") if log.exists() else ""
    if "[code: 2004]" in text[-3000:] or "[code: 2001]" in text[-3000:]:
        return REFUSED
    if "Failed to initialize the connection" in text[-3000:]:
        return "the coordinator is not reachable"
    tail = [line for line in text.strip().splitlines()[-3:] if line.strip()]
    return " | ".join(tail) or "no output"


def serve_site(o: SiteOptions, log: Callable[[str], None] = print) -> int:
    """Run the SuperNode until Ctrl-C, restarting it when the coordinator is away (it gives
    up by itself when refused, e.g. while the coordinator restarts); exit status."""
    o.resolve()
    if o.nproc > 1 and not _launched():
        from atoll.deploy.site_ranks import launch

        return launch(o.nproc, serve_site, o)
    manifest = load_manifest(o.data)  # fail now, not at the first round, on unprepared data
    o.state.mkdir(parents=True, exist_ok=True)
    site = _make_site(o)
    if not site.parallel.is_main:  # not the one that talks to the coordinator
        return _follow(site, log)
    return _serve(o, site, manifest, log)


def _serve(o: SiteOptions, site: Site, manifest: dict, log: Callable[[str], None]) -> int:
    """Rank 0 (or the only process): the SuperNode loop, until Ctrl-C."""
    rows = manifest["splits"]["train"]["rows"]
    if o.insecure:
        log(fc.INSECURE_WARNING)
    env = fc.flower_env(o.state / "flower")
    # Flower starts each ClientApp as `flwr-clientapp` from PATH: ours comes first and
    # runs nothing but atoll's own app (atoll.deploy.app_guard)
    env["PATH"] = os.pathsep.join([str(app_guard.install(o.state / "guard")), env["PATH"]])
    log(f"site {o.name}: serving {o.data} ({rows} training rows of {manifest['seq_len']} "
        f"tokens); state in {o.state}")
    log(f"connecting to {o.coordinator} "
        f"({'INSECURE' if o.insecure else 'TLS, key ' + str(o.key)}); waiting for rounds. "
        f"Ctrl-C stops.")
    worker = _start_worker(o, site, log)
    supernode_log = o.state / "supernode.log"
    failing_since: float | None = None
    backoff = 2.0
    proc = None
    try:
        while True:
            started = time.monotonic()
            mark = supernode_log.stat().st_size if supernode_log.exists() else 0
            proc = fc.start(supernode_command(o, fc.free_port()), supernode_log, env)
            while proc.poll() is None:
                time.sleep(1.0)
            if time.monotonic() - started > 60:  # it had been working: a fresh failure
                failing_since, backoff = None, 2.0
            failing_since = failing_since or started
            why = _why(supernode_log, mark)
            if o.max_wait_s and time.monotonic() - failing_since > o.max_wait_s:
                log(f"site {o.name}: giving up after {o.max_wait_s:.0f}s: {why}")
                return 1
            log(f"site {o.name}: {why}; trying again in {backoff:.0f}s")
            time.sleep(backoff)
            # A refusal is cheap to retry and usually ends when a vanished twin's heartbeat
            # expires; an unreachable coordinator is worth backing off from.
            backoff = min(backoff * 1.5, 5.0 if why == REFUSED else 30.0)
    except KeyboardInterrupt:
        log(f"site {o.name}: stopping")
        fc.stop(proc)
        return 130
    finally:
        worker.close()
        if site.parallel.world > 1:
            worker.site.stop_followers()
        site.parallel.close()


def _launched() -> bool:
    """Whether this process is one of several a launcher started (torchrun, --nproc)."""
    from atoll.train.distributed import launched

    return launched()


def _make_site(o: SiteOptions) -> Site:
    """This process's site (joining the site's other processes when there are some)."""
    import torch

    from atoll.federation.faults import make_site
    from atoll.federation.site import Site
    from atoll.train.device import resolve_device
    from atoll.train.distributed import Parallel, local_device

    if o.threads > 0:
        torch.set_num_threads(o.threads)
    if not _launched():
        site = make_site(o.name, o.data, o.state, fault=o.fault, device=o.device)
    else:
        par = Parallel.from_env(local_device(resolve_device(o.device)), shard=o.shard)
        site = Site(o.name, o.data, o.state, device=o.device, parallel=par)
    site.node_key = None if o.insecure else o.key  # it vouches for the receipt key
    return site


def _follow(site: Site, log: Callable[[str], None]) -> int:
    """A rank other than 0: train with rank 0 until it stops (or Ctrl-C)."""
    from atoll.deploy.site_ranks import follow

    log(f"site {site.name} rank {site.parallel.rank}: training on {site.device}")
    try:
        return follow(site, log)
    except KeyboardInterrupt:
        return 130
    finally:
        site.parallel.close()


def _start_worker(o: SiteOptions, site: Site, log: Callable[[str], None]) -> SiteWorker:
    """The long-lived trainer the ClientApp shim hands rounds to (rank 0's, with several
    processes, handing each plan to the others first)."""
    from atoll.deploy.site_ranks import LeaderSite

    def on_round(update: dict) -> None:
        if update.get("type") == "EvalReport":
            log(f"{time.strftime('%H:%M:%S')} evaluated the weights of round "
                f"{update['round']}: loss {update['loss']:.4f} on {update['tokens']} "
                f"held-out tokens")
            return
        log(f"{time.strftime('%H:%M:%S')} round {update['round']}: {update['steps']} steps, "
            f"{update['tokens']} tokens, loss {update['train_loss']:.4f}, "
            f"{update['seconds']:.1f}s")

    par = site.parallel
    log(f"site {o.name}: training on {site.device}" + (
        f" and {par.world - 1} more processes ("
        f"{'FSDP2' if par.shard else 'DDP, or FSDP2 when one GPU cannot hold the model'})"
        if par.world > 1 else ""))
    served = LeaderSite(site) if par.world > 1 else site
    return SiteWorker(served, o.state, on_round=on_round).start()
