"""``atoll dashboard RUN_DIR``: a local web page that follows a run as it goes.

A read-only HTTP server (the standard library's) with two paths: ``/`` is one
self-contained page (its script and plots are its own: it works offline) and
``/api/state`` is :func:`atoll.app.dashboard_data.dashboard_state` as JSON, which the page
fetches every couple of seconds. It binds to 127.0.0.1 unless told otherwise, answers only
GET and HEAD, and reads nothing outside the run folder's own files.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from atoll.app.dashboard_data import dashboard_state

REFRESH_MS = 2000


def page(refresh_ms: int = REFRESH_MS) -> bytes:
    """The dashboard's HTML, script included."""
    html = (resources.files("atoll") / "app" / "dashboard.html").read_text()
    return html.replace("REFRESH_MS", str(int(refresh_ms))).encode()


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765,
                refresh_ms: int = REFRESH_MS) -> ThreadingHTTPServer:
    """A server for ``run_dir`` (port 0: any free one; ``server.server_port`` says which)."""
    run_dir = Path(run_dir)
    body = page(refresh_ms)
    cache: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", body)
            elif path == "/api/state":
                state = dashboard_state(run_dir, cache)
                self._send(200, "application/json", json.dumps(state).encode())
            else:
                self._send(404, "text/plain", b"not found\n")

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _send(self, code: int, kind: str, data: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one request every two seconds per viewer: not worth a line each

    return ThreadingHTTPServer((host, port), Handler)


def serve_in_background(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765
                        ) -> ThreadingHTTPServer:
    """Start the dashboard in a daemon thread (``atoll coordinator --dashboard``)."""
    server = make_server(run_dir, host, port)
    threading.Thread(target=server.serve_forever, daemon=True, name="dashboard").start()
    return server
