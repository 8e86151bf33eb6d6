"""A slow-link emulator: a user-space TCP proxy with bandwidth, latency and loss.

Put it between the sites and the coordinator (sites dial the proxy, the proxy dials the
SuperLink) to see a federation behave over an ordinary internet link on one machine, where
the kernel's ``netem`` is not available. Each direction of each connection is shaped on its
own, segment by segment (``segment`` bytes, like a TCP segment):

* bandwidth: a segment leaves no earlier than the previous one has finished sending;
* latency: it arrives ``latency_ms`` after it left;
* loss: with probability ``loss`` it is lost once and resent after ``rto_ms`` (TCP's
  retransmission timeout; Linux's minimum is 200 ms). It costs its bandwidth twice, and since
  TCP delivers in order, later segments wait behind it (head-of-line blocking).

The proxy counts what it did (bytes, segments, losses), which is what the tests check.

    atoll slowlink --listen 127.0.0.1:9000 --to 127.0.0.1:8000 --mbit 20 --latency-ms 100 \\
        --loss 0.01
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LinkConfig:
    """One direction's shape (both directions get the same)."""

    mbit: float = 0.0
    """Bandwidth in Mbit/s (0 = unlimited)."""
    latency_ms: float = 0.0
    """One-way delay."""
    loss: float = 0.0
    """Probability that a segment is lost once and resent."""
    rto_ms: float = 200.0
    """Delay of a resent segment."""
    segment: int = 1448
    seed: int = 0

    def check(self) -> None:
        """Refuse a negative bandwidth, delay or timeout and a loss outside [0, 1)."""
        if self.mbit < 0 or self.latency_ms < 0 or self.rto_ms < 0:
            raise ValueError("bandwidth, latency and rto must be >= 0")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")


@dataclass
class LinkStats:
    """What the link has carried so far: connections, bytes, segments and how many were
    lost and resent; the tests read it."""

    connections: int = 0
    bytes: int = 0
    segments: int = 0
    lost: int = 0
    by_direction: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})


class SlowLink:
    """Listens on ``listen`` and forwards every connection to ``target`` through the shape."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int],
                 cfg: LinkConfig) -> None:
        cfg.check()
        self.listen = listen
        self.target = target
        self.cfg = cfg
        self.stats = LinkStats()
        self._rng = random.Random(cfg.seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- shaping ---------------------------------------------------------------------------

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        """Shape one direction: read segments, schedule their arrival, write them in order."""
        cfg = self.cfg
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        link_free = 0.0  # when the link finishes sending what is already queued
        last_arrival = 0.0

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                at, data = item
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(cfg.segment):
                now = time.monotonic()
                if link_free - now > 0.25:  # back-pressure, as a full TCP window would give
                    await asyncio.sleep(link_free - now - 0.25)
                    now = time.monotonic()
                wire = len(data) * 8 / (cfg.mbit * 1e6) if cfg.mbit else 0.0
                lost = cfg.loss > 0 and self._rng.random() < cfg.loss
                link_free = max(link_free, now) + wire * (2 if lost else 1)
                arrival = link_free + cfg.latency_ms / 1e3 + (cfg.rto_ms / 1e3 if lost else 0)
                last_arrival = max(arrival, last_arrival)  # in order, like TCP
                self.stats.bytes += len(data)
                self.stats.segments += 1
                self.stats.lost += int(lost)
                self.stats.by_direction[direction] += len(data)
                await queue.put((last_arrival, data))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            await queue.put(None)
            try:
                await sender
            except (ConnectionError, asyncio.CancelledError):
                sender.cancel()
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, server_w, "up"),
                             self._pipe(server_r, client_w, "down"))

    # -- running in a thread ---------------------------------------------------------------

    def start(self) -> SlowLink:
        """Serve in a background thread; returns once the port is open."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"slow link could not listen on {self.listen}")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, *self.listen))
        self.listen = self._server.sockets[0].getsockname()[:2]  # the real port if 0 was asked
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    def stop(self) -> None:
        """Close the listener and every connection and wait for the proxy's thread (a
        link that never started, or is stopped already, is left alone)."""
        if self._loop is None or self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SlowLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
