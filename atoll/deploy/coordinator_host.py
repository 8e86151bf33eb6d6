"""``atoll coordinator``: the SuperLink plus the run, on the coordinator's machine.

It starts ``flower-superlink`` (TLS and SuperNode authentication unless ``--insecure``)
on loopback, and the fleet gate (:mod:`atoll.deploy.fleet_gate`) on the public address:
sites reach the Fleet API and nothing else, so only this machine can control the run. It
registers every site public key found in the keys directory, launches the atoll ServerApp
with ``flwr run`` and then watches the run: it prints who connects and each round as it
closes, and stops everything cleanly on Ctrl-C. The run folder is the same as a
simulation's; ``--resume`` continues it from its last checkpoint.

The SuperLink keeps its state in ``<run>/flower/superlink.db``, so a restarted coordinator
finds its sites again: they keep retrying and reconnect on their own.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from atoll.deploy import flower_cli as fc
from atoll.deploy.keys import site_public_keys
from atoll.util.atomic import write_atomic

SERVERAPP_PID = "serverapp.pid"
"""In ``<run>/flower/``: the pid of the run's ServerApp process, written as it starts."""


@dataclass
class CoordinatorOptions:
    """Where and how ``atoll coordinator`` serves a run: its folder, address and keys."""

    out: Path
    host: str = "0.0.0.0"
    port: int = 8000
    keys: Path | None = None
    insecure: bool = False
    resume: bool = False
    public_address: str = ""
    """How sites reach this machine (printed for them); default: this host's name."""
    sites: list[str] = field(default_factory=list)
    """The config's ``[[sites]]``: only their keys are registered, and a site registered
    before that the config no longer names is unregistered (empty: every key in ``keys``)."""


class CoordinatorHost:
    """The SuperLink process, the Flower run, and a console that follows them."""

    def __init__(self, opts: CoordinatorOptions, log: Callable[[str], None] = print,
                 on_poll: Callable[[], None] = lambda: None) -> None:
        self.opts = opts
        self.log = log
        self.on_poll = on_poll  # shows what the run folder gained (atoll.app.follow)
        self.flower = opts.out / "flower"
        self.env = fc.flower_env(self.flower / "home")
        self.superlink = None
        self.gate = None
        self.superlink_port = fc.free_port()  # loopback only: control stays on this host
        self.run_id: int | None = None
        self.finished = False
        if not opts.insecure and opts.keys is None:
            raise ValueError("give --keys DIR (made by `atoll keys`), or --insecure for "
                             "loopback development")
        if opts.keys is not None:
            for name in ("ca.crt", "server.pem", "server.key"):
                if not (opts.keys / name).exists():
                    raise FileNotFoundError(f"{opts.keys / name} is missing (run atoll keys)")

    def start_superlink(self) -> None:
        """Start ``flower-superlink`` on loopback (TLS and SuperNode authentication unless
        insecure) and the fleet gate in front of it; wait until both listen."""
        o = self.opts
        end_orphaned_serverapp(self.flower / SERVERAPP_PID, self.log)
        cmd = [fc.tool("flower-superlink"), "--disable-runtime-dependency-installation",
               "--database", str(self.flower / "superlink.db"),
               "--host", "127.0.0.1", "--port", str(self.superlink_port)]
        gate = [sys.executable, "-m", "atoll.deploy.fleet_gate",
                "--listen", f"{o.host}:{o.port}", "--upstream", f"127.0.0.1:{self.superlink_port}"]
        if o.insecure:
            cmd.append("--insecure")
        else:
            tls = ["--ssl-ca-certfile", str(o.keys / "ca.crt"),
                   "--ssl-certfile", str(o.keys / "server.pem"),
                   "--ssl-keyfile", str(o.keys / "server.key")]
            cmd += [*tls, "--enable-supernode-auth"]
            gate += ["--ca", tls[1], "--cert", tls[3], "--key", tls[5]]
        self.superlink = fc.start(cmd, self.flower / "superlink.log", self.env)
        fc.wait_for_port("127.0.0.1", self.superlink_port, 90, self.superlink)
        self.gate = fc.start(gate, self.flower / "gate.log", self.env)
        fc.wait_for_port("127.0.0.1" if o.host in ("0.0.0.0", "::") else o.host, o.port, 60,
                         self.gate)
        fc.write_connection(self.flower / "home", f"127.0.0.1:{self.superlink_port}",
                            None if o.insecure else o.keys / "ca.crt")

    def register_sites(self) -> list[str]:
        """Register the keys of the sites the config names (every ``sites/*.pub`` of the
        keys directory if it names none) under their names; unregister the nodes of sites
        registered on an earlier start that the config no longer names."""
        keys = site_public_keys(self.opts.keys)
        wanted = set(self.opts.sites) or set(keys)
        book = self.flower / "registered.json"  # site name -> node id, as Flower gave it
        registered = json.loads(book.read_text()) if book.exists() else {}
        for name in sorted(set(registered) - wanted):
            node = registered.pop(name)
            res = fc.flwr_json(["supernode", "unregister", str(node), fc.CONNECTION], self.env)
            self.log(f"unregistered site {name} (node {node}): not in the config any more"
                     if res.get("success") else
                     f"could not unregister site {name}: {res.get('error-message')}")
        for name in sorted(wanted - set(keys)):
            self.log(f"no key for site {name}: atoll keys {self.opts.keys} --add-site "
                     f"{name}.pub")
        for name in sorted(wanted & set(keys)):
            res = fc.flwr_json(["supernode", "register", str(keys[name]), fc.CONNECTION,
                                "--name", name], self.env)
            if res.get("success"):
                registered[name] = int(res["node-id"])
            elif "already in use" not in res.get("error-message", ""):
                raise RuntimeError(f"registering site {name}: {res.get('error-message')}")
        write_atomic(book, json.dumps(registered).encode())
        return sorted(wanted & set(keys))

    def start_run(self, config_path: Path) -> int:
        """Launch the atoll ServerApp on the SuperLink with ``flwr run``; the Flower run id."""
        app = fc.write_app(self.flower / "app")
        run_config = fc.write_toml(self.flower / "run-config.toml", {
            "config": str(config_path.resolve()), "out": str(self.opts.out.resolve()),
            "resume": self.opts.resume, "authenticated": not self.opts.insecure})
        res = fc.flwr_json(["run", str(app), fc.CONNECTION, "--run-config", str(run_config)],
                           self.env)
        if not res.get("success"):
            raise RuntimeError(f"flwr run failed: {res.get('error-message')}")
        self.run_id = int(res["run-id"])
        return self.run_id

    def run_status(self) -> tuple[str, str]:
        """(status, details) of our Flower run, e.g. ("finished:completed", "")."""
        res = fc.flwr_json(["ls", fc.CONNECTION, "--run-id", str(self.run_id)], self.env)
        for run in res.get("runs", []):
            if int(run.get("run-id", -1)) == self.run_id:
                return str(run.get("status", "")), str(run.get("status-details", ""))
        return "unknown", ""

    def follow(self, poll_s: float = 2.0) -> str:
        """Print progress until the run ends; returns its final status."""
        last_check = 0.0
        while True:
            self.on_poll()
            if time.monotonic() - last_check > 5:
                last_check = time.monotonic()
                status, details = self.run_status()
                if status.startswith("finished"):
                    self.finished = True
                    self.on_poll()
                    if details and details != "N/A":
                        self.log(f"run {status}: {details}")
                    return status
            if self.superlink.poll() is not None:
                return f"superlink exited with status {self.superlink.returncode}"
            if self.gate is not None and self.gate.poll() is not None:
                return f"fleet gate exited with status {self.gate.returncode}"
            time.sleep(poll_s)

    def stop(self) -> None:
        """Stop the Flower run (if it is still going), the gate and the SuperLink."""
        if self.run_id is not None and not self.finished and self.superlink is not None \
                and self.superlink.poll() is None:
            try:
                fc.flwr(["stop", str(self.run_id), fc.CONNECTION], self.env, timeout_s=30)
            except (RuntimeError, OSError):
                pass
        fc.stop(self.gate)
        fc.stop(self.superlink)


def serve_coordinator(opts: CoordinatorOptions, config_path: Path,
                      log: Callable[[str], None] = print,
                      on_poll: Callable[[], None] = lambda: None) -> int:
    """Run the coordinator on the resolved ``config_path`` until the federated run ends;
    the process exit status. ``on_poll`` is called every couple of seconds meanwhile."""
    coord = CoordinatorHost(opts, log, on_poll)
    if opts.insecure:
        log(fc.INSECURE_WARNING)
    try:
        coord.start_superlink()
        public = opts.public_address or f"{_hostname()}:{opts.port}"
        log(f"coordinator listening on {opts.host}:{opts.port} "
            f"({'INSECURE' if opts.insecure else 'TLS, authenticated sites only'})")
        if not opts.insecure:
            names = coord.register_sites()
            log(f"registered site keys: {', '.join(names) or 'none (add with atoll keys)'}")
        run_id = coord.start_run(config_path)
        log(f"run {run_id} started; run folder {opts.out}")
        how = "--insecure" if opts.insecure else "--key YOUR_KEY --ca ca.crt"
        log(f"sites join with: atoll site --coordinator {public} --data DIR --name NAME {how}")
        status = coord.follow()
    except KeyboardInterrupt:
        log("stopping: the last finished round is checkpointed; continue with --resume")
        coord.stop()
        return 130
    finally:
        coord.stop()
    log(f"run {status}; report: {opts.out / 'report.html'}")
    return 0 if status == "finished:completed" else 1


def end_orphaned_serverapp(pid_file: Path, log: Callable[[str], None],
                           wait_s: float = 20.0) -> bool:
    """End the ServerApp of an earlier start of this run if it is still alive.

    A coordinator killed outright (power, OOM, SIGKILL) can leave Flower's ``flwr-serverapp``
    process running: it holds the run folder's lock, and a resumed run would wait on it. Its
    pid is in ``pid_file``; a process is only signalled if its command line is Flower's
    ServerApp, so a reused pid is left alone. True when one was ended."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    if b"serverapp" not in cmdline:
        return False
    log(f"ending the ServerApp left by the last start (pid {pid})")
    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return True
            time.sleep(0.2)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def _hostname() -> str:
    import socket

    return socket.getfqdn() or "localhost"
