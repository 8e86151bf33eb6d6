"""The slow-link emulator really delays, throttles and loses, as set (checked against its
own settings and counters, with generous margins: never a tight wall-clock bound)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from atoll.deploy.slowlink import LinkConfig, SlowLink


class Echo:
    """A TCP server that answers each request with `n` bytes, n being the request's length."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            while header := conn.recv(16):
                want = int(header.decode())
                conn.sendall(b"x" * want)


def fetch(port: int, n: int) -> float:
    """Ask for n bytes through `port`; seconds until all arrived."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        s.sendall(f"{n:16d}".encode())
        got = 0
        while got < n:
            chunk = s.recv(1 << 16)
            assert chunk
            got += len(chunk)
        return time.perf_counter() - start


@pytest.fixture(scope="module")
def echo():
    return Echo()


def test_latency_is_added_both_ways(echo):
    with SlowLink(("127.0.0.1", 0), ("127.0.0.1", echo.port), LinkConfig(latency_ms=150)) as link:
        rtt = min(fetch(link.listen[1], 10) for _ in range(3))
    assert rtt >= 0.3  # request and answer each wait 150 ms
    assert rtt < 3.0


def test_bandwidth_is_throttled(echo):
    n = 1_000_000  # 8 Mbit at 4 Mbit/s: at least 2 s
    with SlowLink(("127.0.0.1", 0), ("127.0.0.1", echo.port), LinkConfig(mbit=4)) as link:
        seconds = fetch(link.listen[1], n)
        stats = link.stats
    assert seconds >= 0.95 * n * 8 / 4e6
    assert n * 8 / seconds / 1e6 > 4 * 0.5  # and not absurdly slower than set
    assert stats.by_direction["down"] == n and stats.by_direction["up"] == 16


def test_loss_resends_segments_and_costs_time(echo):
    n = 400_000
    cfg = LinkConfig(mbit=100, loss=0.05, rto_ms=100, seed=1)
    with SlowLink(("127.0.0.1", 0), ("127.0.0.1", echo.port), cfg) as link:
        seconds = fetch(link.listen[1], n)
        stats = link.stats
    assert stats.segments >= n // cfg.segment
    expected = 0.05 * stats.segments
    assert abs(stats.lost - expected) < 4 * expected ** 0.5 + 2  # binomial, 4 sigma
    assert seconds >= 0.1  # at least one resend timeout on the way


def test_bad_settings():
    with pytest.raises(ValueError, match="loss"):
        LinkConfig(loss=1.5).check()
