"""Attacks on a running coordinator that use Flower's own tools: the ``flwr`` CLI of an
outsider who holds only the federation's ``ca.crt`` (as every site does), and an app that is
not atoll's, started on the SuperLink as a compromised coordinator host could."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

from atoll.deploy import flower_cli as fc

EVIL_SERVER = '''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()

@app.main()
def main(grid, context):
    deadline = time.monotonic() + 90
    nodes = list(grid.get_node_ids())
    while len(nodes) < {sites} and time.monotonic() < deadline:
        time.sleep(1)
        nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({{"q": ConfigRecord({{"x": 1}})}}), dst_node_id=n,
                    message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=90))
    Path({result!r}).write_text(json.dumps(
        [r.error.reason if r.has_error() else "ran" for r in replies]))
'''
EVIL_CLIENT = '''
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.query()
def query(msg, context):
    Path({marker!r}).write_text("the stranger's code ran next to the site's data")
    return Message(RecordDict(), reply_to=msg)
'''


def write_evil_app(folder: Path, sites: int, marker: Path, result: Path) -> Path:
    """An app that names itself ``atoll`` but brings its own code: its ClientApp writes
    ``marker`` wherever it runs; its ServerApp writes the sites' answers to ``result``."""
    (folder / "evil_app").mkdir(parents=True)
    (folder / "evil_app" / "__init__.py").write_text("")
    (folder / "evil_app" / "server.py").write_text(
        EVIL_SERVER.format(sites=sites, result=str(result)))
    (folder / "evil_app" / "client.py").write_text(EVIL_CLIENT.format(marker=str(marker)))
    (folder / "pyproject.toml").write_text(textwrap.dedent('''
        [project]
        name = "atoll"
        version = "1.0.0"
        dependencies = []
        [tool.flwr.app]
        publisher = "atoll"
        [tool.flwr.app.components]
        serverapp = "evil_app.server:app"
        clientapp = "evil_app.client:app"
        [tool.flwr.app.config]
        '''))
    return folder


def flwr_as(home: Path, *args: str) -> subprocess.CompletedProcess:
    """One ``flwr`` command with the connection kept in ``home``."""
    return subprocess.run([fc.tool("flwr"), *args], env=fc.flower_env(home),
                          capture_output=True, text=True, timeout=120)


def outsider(home: Path, port: int, ca: Path) -> Path:
    """The ``flwr`` set-up of someone who knows the address and holds ``ca.crt``."""
    fc.write_connection(home, f"127.0.0.1:{port}", ca)
    return home


def control_attempts(home: Path, evil_app: Path, run_id: str
                     ) -> dict[str, subprocess.CompletedProcess]:
    """What the outsider tries: list runs and nodes, stop the run, start their own app."""
    c = fc.CONNECTION
    return {"ls": flwr_as(home, "ls", c), "supernode list": flwr_as(home, "supernode", "list", c),
            "stop": flwr_as(home, "stop", run_id, c), "run": flwr_as(home, "run", str(evil_app), c)}


def wait_for_json(path: Path, timeout_s: float) -> list | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(1.0)
    return None
