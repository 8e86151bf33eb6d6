"""``atoll site``: a SuperNode serving one site's data to a federation.

The site dials out to the coordinator (so NAT is fine), authenticates with its private key
over TLS, and trains whenever the coordinator sends a round. Its data never leaves this
machine; its state between rounds (inner optimizer, data cursor) lives in ``--state``. If
the coordinator goes away, the SuperNode keeps retrying and carries on when it is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atoll.data.reader import load_manifest
from atoll.deploy import flower_cli as fc

INSECURE_WARNING = ("WARNING: --insecure: no TLS and no authentication; use only on loopback "
                    "for development.")


@dataclass
class SiteOptions:
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
    fault: str = ""
    """Testing only: make this site misbehave (see atoll.federation.faults)."""

    def resolve(self) -> None:
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
    node_config = (f"name='{o.name}' data='{o.data.resolve()}' "
                   f"state='{o.state.resolve()}' threads={o.threads}")
    if o.fault:
        node_config += f" fault='{o.fault}'"
    cmd = [fc.tool("flower-supernode"), "--superlink", o.coordinator, "--port", str(port),
           "--node-config", node_config]
    if o.insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(o.ca.resolve()),
            "--auth-supernode-private-key", str(o.key.resolve())]


def serve(o: SiteOptions, log: Callable[[str], None] = print) -> int:
    """Run the SuperNode until Ctrl-C (or until it gives up); the process exit status."""
    o.resolve()
    manifest = load_manifest(o.data)  # fail now, not at the first round, on unprepared data
    rows = manifest["splits"]["train"]["rows"]
    o.state.mkdir(parents=True, exist_ok=True)
    if o.insecure:
        log(INSECURE_WARNING)
    home = o.state / "flower"
    env = fc.flower_env(home)
    port = fc.free_port()
    proc = fc.start(supernode_command(o, port), o.state / "supernode.log", env)
    log(f"site {o.name}: serving {o.data} ({rows} training rows of {manifest['seq_len']} "
        f"tokens); state in {o.state}")
    log(f"connecting to {o.coordinator} "
        f"({'INSECURE' if o.insecure else 'TLS, key ' + str(o.key)}); waiting for rounds. "
        f"Ctrl-C stops.")
    activity = o.state / "activity.log"
    seen = activity.stat().st_size if activity.exists() else 0
    try:
        while proc.poll() is None:
            if activity.exists() and activity.stat().st_size > seen:
                with open(activity) as f:
                    f.seek(seen)
                    for line in f.read().splitlines():
                        log(line)
                    seen = f.tell()
            time.sleep(1.0)
    except KeyboardInterrupt:
        log(f"site {o.name}: stopping")
        fc.stop(proc)
        return 130
    tail = (o.state / "supernode.log").read_text().strip().splitlines()[-3:]
    log(f"site {o.name}: the SuperNode exited with status {proc.returncode}: "
        + " | ".join(tail))
    return 1
