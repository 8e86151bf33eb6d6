"""``atoll coordinator``: the SuperLink plus the run, on the coordinator's machine.

It starts ``flower-superlink`` (TLS and SuperNode authentication unless ``--insecure``),
registers every site public key found in the keys directory, launches the atoll ServerApp
with ``flwr run`` and then watches the run: it prints who connects and each round as it
closes, and stops everything cleanly on Ctrl-C. The run folder is the same as a
simulation's; ``--resume`` continues it from its last checkpoint.

The SuperLink keeps its state in ``<run>/flower/superlink.db``, so a restarted coordinator
finds its sites again: they keep retrying and reconnect on their own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atoll.config import save as save_config
from atoll.deploy import flower_cli as fc
from atoll.deploy.keys import site_public_keys
from atoll.metrics import read_metrics
from atoll.run_config import load_run_config

INSECURE_WARNING = ("WARNING: --insecure: no TLS and no site authentication. Anyone who can "
                    "reach this port can join, read the model and send updates. Use it only "
                    "on loopback for development.")


@dataclass
class CoordinatorOptions:
    out: Path
    config: Path | None = None
    """The run config; None with ``resume`` (the run folder's own config.toml is used)."""
    overrides: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    port: int = 8000
    keys: Path | None = None
    insecure: bool = False
    resume: bool = False
    public_address: str = ""
    """How sites reach this machine (printed for them); default: this host's name."""


class Coordinator:
    """The SuperLink process, the Flower run, and a console that follows them."""

    def __init__(self, opts: CoordinatorOptions, log: Callable[[str], None] = print) -> None:
        self.opts = opts
        self.log = log
        self.flower = opts.out / "flower"
        self.env = fc.flower_env(self.flower / "home")
        self.superlink = None
        self.run_id: int | None = None
        self.finished = False
        self._seen_rounds = 0
        self._seen_sites: list[str] | None = None
        if not opts.insecure and opts.keys is None:
            raise ValueError("give --keys DIR (made by `atoll keys`), or --insecure for "
                             "loopback development")
        if opts.keys is not None:
            for name in ("ca.crt", "server.pem", "server.key"):
                if not (opts.keys / name).exists():
                    raise FileNotFoundError(f"{opts.keys / name} is missing (run atoll keys)")

    def prepare_run_folder(self) -> Path:
        """The resolved config the ServerApp will read, checked before anything starts."""
        o = self.opts
        path = o.out / "config.toml"
        if o.resume:
            if not (o.out / "run.json").exists():
                raise FileNotFoundError(f"{o.out} holds no run to resume (no run.json)")
            load_run_config(path, list(o.overrides), simulation=False)
            if o.overrides:
                save_config(load_run_config(path, list(o.overrides), simulation=False), path)
            return path
        if (o.out / "run.json").exists():
            raise FileExistsError(f"{o.out} already holds a run: use --resume, or another --out")
        cfg = load_run_config(o.config, list(o.overrides), simulation=False)
        cfg.baseline.kinds = []
        save_config(cfg, path)
        return path

    def start_superlink(self) -> None:
        o = self.opts
        cmd = [fc.tool("flower-superlink"), "--disable-runtime-dependency-installation",
               "--database", str(self.flower / "superlink.db"),
               "--host", o.host, "--port", str(o.port)]
        if o.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(o.keys / "ca.crt"),
                    "--ssl-certfile", str(o.keys / "server.pem"),
                    "--ssl-keyfile", str(o.keys / "server.key"), "--enable-supernode-auth"]
        self.superlink = fc.start(cmd, self.flower / "superlink.log", self.env)
        fc.wait_for_port("127.0.0.1", o.port, 90, self.superlink)
        fc.write_connection(self.flower / "home", f"127.0.0.1:{o.port}",
                            None if o.insecure else o.keys / "ca.crt")

    def register_sites(self) -> list[str]:
        """Register every ``sites/*.pub`` of the keys directory under its site name."""
        names = []
        for name, pub in site_public_keys(self.opts.keys).items():
            res = fc.flwr_json(["supernode", "register", str(pub), fc.CONNECTION,
                                "--name", name], self.env)
            if not res.get("success") and "already in use" not in res.get("error-message", ""):
                raise RuntimeError(f"registering site {name}: {res.get('error-message')}")
            names.append(name)
        return names

    def start_run(self, config_path: Path) -> int:
        app = fc.write_app(self.flower / "app")
        run_config = (f"config='{config_path.resolve()}' out='{self.opts.out.resolve()}' "
                      f"resume={'true' if self.opts.resume else 'false'}")
        res = fc.flwr_json(["run", str(app), fc.CONNECTION, "--run-config", run_config],
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
            self._print_progress()
            if time.monotonic() - last_check > 5:
                last_check = time.monotonic()
                status, details = self.run_status()
                if status.startswith("finished"):
                    self.finished = True
                    self._print_progress()
                    if details and details != "N/A":
                        self.log(f"run {status}: {details}")
                    return status
            if self.superlink.poll() is not None:
                return f"superlink exited with status {self.superlink.returncode}"
            time.sleep(poll_s)

    def _print_progress(self) -> None:
        status_file = self.opts.out / "status.json"
        if status_file.exists():
            try:
                connected = json.loads(status_file.read_text())["connected"]
            except (ValueError, KeyError):
                connected = None
            if connected is not None and connected != self._seen_sites:
                self._seen_sites = connected
                self.log(f"connected sites: {', '.join(connected) or 'none yet'}")
        rounds = [r for r in read_metrics(self.opts.out / "metrics.jsonl")
                  if r["kind"] == "round" and r["round"] > 0]
        for r in rounds[self._seen_rounds:]:
            val = r.get("val_loss") or {}
            v = f"  val {sum(val.values()) / len(val):.4f}" if val else ""
            rej = f"  rejected {sorted(r['rejected'])}" if r.get("rejected") else ""
            loss = r.get("train_loss")
            self.log(f"round {r['round']}: sites {', '.join(r['sites']) or 'none'}  train "
                     f"{'-' if loss is None else f'{loss:.4f}'}{v}{rej}  {r['seconds']:.1f}s")
        self._seen_rounds = max(self._seen_rounds, len(rounds))

    def stop(self) -> None:
        if self.run_id is not None and not self.finished and self.superlink is not None \
                and self.superlink.poll() is None:
            try:
                fc.flwr(["stop", str(self.run_id), fc.CONNECTION], self.env, timeout_s=30)
            except (RuntimeError, OSError):
                pass
        fc.stop(self.superlink)


def serve(opts: CoordinatorOptions, log: Callable[[str], None] = print) -> int:
    """Run the coordinator until the federated run ends; the process exit status."""
    coord = Coordinator(opts, log)
    config_path = coord.prepare_run_folder()
    if opts.insecure:
        log(INSECURE_WARNING)
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
        how = "--insecure" if opts.insecure else f"--keys {opts.keys}"
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


def _hostname() -> str:
    import socket

    return socket.getfqdn() or "localhost"
