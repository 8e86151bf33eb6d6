"""The site worker: one long-lived process that trains, behind a thin Flower ClientApp.

Flower starts a fresh ClientApp process for every message. Loading torch, transformers and
the model in each of them would cost seconds per round, so ``atoll site`` keeps the
:class:`~atoll.federation.site.Site` in its own process and serves it on a local socket
(``state/worker.sock``, guarded by a random key in ``state/worker.key``, owner-only). The
ClientApp only passes the plan's bytes to the worker and the update's bytes back: it never
imports torch.

This module is imported by the ClientApp shim: keep its top level free of heavy imports.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

SOCKET = "worker.sock"
KEY = "worker.key"
HANDSHAKE_S = 30.0
"""How long either side waits for the other's part of the key handshake."""


def call_worker(state_dir: str | Path, head: dict[str, Any], blob: bytes,
                timeout_s: float | None = None) -> tuple[dict[str, Any], bytes]:
    """Send a plan (header + weights bytes) to the site worker; its (header, bytes) reply.

    A worker that does not answer within ``timeout_s`` (default: the round's own bound,
    :func:`~atoll.util.deadlines.round_deadline_s` of the plan's time budget) raises
    :class:`TimeoutError` rather than holding the ClientApp forever."""
    from atoll.util.deadlines import round_deadline_s

    state_dir = Path(state_dir)
    key = (state_dir / KEY).read_bytes()
    if timeout_s is None:
        timeout_s = round_deadline_s(float(head.get("time_budget_s", 0) or 0))
    with Client(str(state_dir / SOCKET), family="AF_UNIX") as conn:
        try:
            _read_timeout(conn, HANDSHAKE_S)
            answer_challenge(conn, key)
            deliver_challenge(conn, key)
            conn.send_bytes(json.dumps(head).encode())
            conn.send_bytes(blob)
            _read_timeout(conn, timeout_s)
            reply = json.loads(conn.recv_bytes())
            if "error" in reply:
                raise RuntimeError(reply["error"])
            return reply, conn.recv_bytes()
        except BlockingIOError:  # what a read past SO_RCVTIMEO raises
            raise TimeoutError(f"the site worker at {state_dir / SOCKET} did not answer "
                               f"within {timeout_s:g}s") from None


def _read_timeout(conn: Any, seconds: float) -> None:
    """Make every later read on ``conn`` give up after ``seconds`` (the socket's own
    ``SO_RCVTIMEO``: it bounds the reads inside the handshake too)."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", whole, int((seconds - whole) * 1e6)))
    finally:
        sock.close()


class SiteWorker:
    """Serves :meth:`~atoll.federation.site.Site.answer` for one site on a Unix socket in
    its state directory."""

    def __init__(self, site: Any, state_dir: Path,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.site = site
        self.on_round = on_round
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        key_path = self.state_dir / KEY
        key_path.write_bytes(key)
        key_path.chmod(0o600)
        sock = self.state_dir / SOCKET
        sock.unlink(missing_ok=True)
        self._key = key
        # the handshake is done per connection, in its own thread (Listener's authkey would
        # do it inside accept(): one failed or stalled client would stop the serving loop)
        self.listener = Listener(str(sock), family="AF_UNIX")
        os.chmod(sock, 0o600)
        self._lock = threading.Lock()  # one round at a time, as one SuperNode sends them
        # evaluation uses a model of its own: it never waits for (or stops) training
        self._eval_lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self._stop_ahead = threading.Event()
        self._ahead: threading.Thread | None = None

    def start(self) -> SiteWorker:
        """Start serving in a background thread; returns ``self``."""
        self.thread.start()
        return self

    def _serve(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handshake(self, conn: Any) -> bool:
        """Whether the caller proved it holds the key (within :data:`HANDSHAKE_S`)."""
        try:
            _read_timeout(conn, HANDSHAKE_S)
            deliver_challenge(conn, self._key)
            answer_challenge(conn, self._key)
        except (AuthenticationError, EOFError, OSError):
            return False
        return True

    def _handle(self, conn: Any) -> None:
        with conn:
            if not self._handshake(conn):
                return  # refused; the loop goes on accepting
            try:
                head = json.loads(conn.recv_bytes())
                blob = conn.recv_bytes()
                if head.get("type") in ("EvalRequest", "FeatureRequest"):
                    with self._eval_lock:
                        reply, out = self.site.answer(head, blob)
                else:
                    with self._lock:
                        self._stop_training_ahead()
                        reply, out = self.site.answer(head, blob)
                        if self.site.overlap_steps:
                            self._train_ahead(self.site.overlap_steps)
            except Exception as e:  # noqa: BLE001 - reported to the coordinator, not fatal
                conn.send_bytes(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
                return
            conn.send_bytes(json.dumps(reply).encode())
            conn.send_bytes(out)
            if self.on_round is not None:
                self.on_round(reply)

    def _train_ahead(self, max_steps: int) -> None:
        """Overlap: keep training while the update travels and the next plan is made."""
        self._stop_ahead = threading.Event()
        self._ahead = threading.Thread(target=self.site.train_ahead,
                                       args=(max_steps, self._stop_ahead), daemon=True)
        self._ahead.start()

    def _stop_training_ahead(self) -> None:
        if self._ahead is not None:
            self._stop_ahead.set()
            self._ahead.join()
            self._ahead = None

    def close(self) -> None:
        """Stop training ahead and stop serving (the socket is removed)."""
        self._stop_training_ahead()
        self.listener.close()
        (self.state_dir / SOCKET).unlink(missing_ok=True)
