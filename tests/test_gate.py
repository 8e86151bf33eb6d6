"""The fleet gate and the site's app guard, piece by piece (the whole, against real Flower
processes, is in tests/test_hostile.py)."""

from __future__ import annotations

import http.client
import http.server
import io
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from atoll.deploy.app_guard import AppRefused, check_fab
from atoll.deploy.fleet_gate import GateConfig, build, is_fleet_request
from atoll.deploy.flower_cli import free_port, write_app


class Upstream(http.server.BaseHTTPRequestHandler):
    """A stand-in SuperLink that echoes what reached it."""

    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Upstream.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Echo-Auth", self.headers.get("X-Node-Key", ""))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def gate() -> Iterator[int]:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    cfg = GateConfig("127.0.0.1", port, f"127.0.0.1:{upstream.server_address[1]}")
    server = uvicorn.Server(uvicorn.Config(build(cfg), host="127.0.0.1", port=port,
                                           log_level="warning", ws="none"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    upstream.shutdown()


def call(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes, dict]:
    """One request with ``path`` sent as written (http.client does not normalise it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"X-Node-Key": "k1",
                                                  "Content-Length": str(len(body))})
    res = conn.getresponse()
    out = res.status, res.read(), dict(res.getheaders())
    conn.close()
    return out


def test_fleet_calls_pass_with_their_body_and_headers(gate):
    body = bytes(range(256)) * 40_000  # 10 MB: streamed through, byte for byte
    status, got, headers = call(gate, "POST", "/v1/fleet/push-object", body)
    assert status == 200 and got == body and headers["x-echo-auth"] == "k1"
    assert Upstream.seen[-1] == "/v1/fleet/push-object"


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/control/start-run"), ("POST", "/v1/control/list-nodes"),
    ("POST", "/v1/runtime/pull-task-input"), ("GET", "/v1/fleet/pull-messages"),
    ("POST", "/v1/fleet/../control/stop-run"), ("POST", "/v1/fleet/%2e%2e/control/stop-run"),
    ("POST", "/v1/fleet//control"), ("POST", "/v1/fleet/pull-messages?x=/v1/control"),
    ("POST", "/"), ("POST", "/v1/FLEET/pull-messages")])
def test_everything_else_is_refused_before_it_reaches_the_superlink(gate, method, path):
    before = len(Upstream.seen)
    status, body, _ = call(gate, method, path, b"x")
    assert status == 403 and b"only the Fleet API" in body
    assert len(Upstream.seen) == before


def test_the_fleet_path_rule():
    assert is_fleet_request("POST", b"/v1/fleet/send-node-heartbeat", b"")
    assert not is_fleet_request("POST", b"/v1/fleet/send-node-heartbeat", b"a=1")
    assert not is_fleet_request("PUT", b"/v1/fleet/push-object", b"")
    assert not is_fleet_request("POST", b"/v1/fleet/a.b", b"")


def _fab(files: dict[str, bytes]) -> bytes:
    import hashlib

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(".info/CONTENT", "".join(
            f"{n},{hashlib.sha256(d).hexdigest()},{len(d)}\n" for n, d in files.items()))
    return buf.getvalue()


def _atolls_pyproject(tmp_path: Path) -> bytes:
    return (write_app(tmp_path / "app") / "pyproject.toml").read_bytes()


def test_atolls_own_app_bundle_is_accepted(tmp_path):
    check_fab(_fab({"pyproject.toml": _atolls_pyproject(tmp_path)}))


@pytest.mark.parametrize("change,words", [
    (lambda p: p, "holds ['atoll/__init__.py']"),  # code that would shadow the real atoll
    (lambda p: p.replace(b"atoll.engines.flower_client:client_app", b"evil:app"),
     "clientapp = 'evil:app'"),
    (lambda p: p.replace(b"dependencies = []", b'dependencies = ["evil"]'),
     "dependencies = ['evil']"),
    (lambda p: p.replace(b'publisher = "atoll"', b'publisher = "mallory"'),
     "publisher = 'mallory'"),
    (lambda p: b"[project\n", "does not parse")])
def test_any_other_app_bundle_is_refused(tmp_path, change, words):
    files = {"pyproject.toml": change(_atolls_pyproject(tmp_path))}
    if "atoll/__init__" in words:
        files["atoll/__init__.py"] = b"import os"
    with pytest.raises(AppRefused, match=words.replace("[", r"\[").replace("(", r"\(")):
        check_fab(_fab(files))


def test_a_bundle_whose_content_list_lies_or_that_is_no_zip_is_refused(tmp_path):
    good = _fab({"pyproject.toml": _atolls_pyproject(tmp_path)})
    with pytest.raises(AppRefused, match="not a zip"):
        check_fab(b"PK\x03\x04 not really")
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", src.read("pyproject.toml") + b"\n# changed")
        z.writestr(".info/CONTENT", src.read(".info/CONTENT"))
    with pytest.raises(AppRefused, match="content list does not match"):
        check_fab(buf.getvalue())
