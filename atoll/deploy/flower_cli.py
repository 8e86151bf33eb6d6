"""Driving Flower's own programs: ``flower-superlink``, ``flower-supernode`` and ``flwr``.

atoll starts the real Flower processes (Deployment Engine) and talks to them only through
their command lines, so any Flower 1.42 installation behaves as Flower documents it. Each
process runs in its own process group so that stopping it also stops the helpers it spawns
(SuperExec, ServerApp and ClientApp processes).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from atoll.util.atomic import write_atomic

APP_NAME = "atoll"
CONNECTION = "atoll"

INSECURE_WARNING = ("WARNING: --insecure: no TLS and no site authentication. Anyone who can "
                    "reach the coordinator's port can join, read the model and send updates. "
                    "Use it only on loopback for development.")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: its own FLWR_HOME, no telemetry, no update check."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # the app's code is atoll itself, already installed: never `uv sync` a new venv
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        "PYTHONUNBUFFERED": "1",
        # Flower starts its helpers (flower-superexec, flwr-clientapp) by name
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    })
    return env


def tool(name: str) -> str:
    """The path of a Flower program installed beside this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (for a local Flower process)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None
                  ) -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before "
                               f"listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` with output appended to ``log``.

    It stays in our process group, so whatever takes down the atoll command (Ctrl-C in its
    terminal, the machine's supervisor killing the group) takes the Flower process too.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGINT (Flower shuts down cleanly on it, with its helpers), SIGKILL after ``grace_s``."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def stop_group(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """Like :func:`stop`, for a process started with ``start_new_session=True``: SIGINT to
    its whole group, then SIGKILL to whatever of the group is left, so the Flower processes
    it started never outlive it."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return  # the whole group is gone
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as a TOML file at ``path``: every string is quoted and escaped by a TOML
    writer, so a path or name holding quotes, spaces or newlines stays one value."""
    write_atomic(path, tomli_w.dumps(data).encode())
    return path


def write_connection(flwr_home: Path, address: str, ca: Path | None) -> None:
    """The ``flwr`` CLI's connection to our SuperLink (``$FLWR_HOME/config.toml``)."""
    conn: dict[str, Any] = {"address": address}
    conn |= {"root-certificates": str(ca.resolve())} if ca else {"insecure": True}
    write_toml(flwr_home / "config.toml", {"superlink": {"default": CONNECTION,
                                                          CONNECTION: conn}})


def write_app(app_dir: Path) -> Path:
    """A Flower App whose code is the installed ``atoll`` package: the FAB is this one file."""
    write_toml(app_dir / "pyproject.toml", {
        "project": {"name": APP_NAME, "version": "1.0.0",
                    "description": "atoll federated pre-training", "license": "Apache-2.0",
                    "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "atoll",
            "components": {"serverapp": "atoll.app.flower_server:server_app",
                           "clientapp": "atoll.engines.flower_client:client_app"},
            "config": {"config": "", "out": "", "resume": False,
                       "authenticated": False}}}}})
    return app_dir


def flwr(args: list[str], env: dict[str, str], timeout_s: float = 120
         ) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI; raises RuntimeError with its output when it fails."""
    res = subprocess.run([tool("flwr"), *args], env=env, capture_output=True, text=True,
                         timeout=timeout_s)
    if res.returncode != 0:
        msg = (res.stdout + res.stderr).strip().splitlines()
        raise RuntimeError(f"flwr {args[0]} failed: {msg[-1] if msg else res.returncode}")
    return res


def flwr_json(args: list[str], env: dict[str, str]) -> dict:
    """Run the ``flwr`` CLI with ``--format json``; its JSON answer."""
    res = flwr([*args, "--format", "json"], env)
    return json.loads(res.stdout[res.stdout.index("{"):])
