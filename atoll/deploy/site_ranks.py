"""``atoll site`` as several processes: one per GPU (``--nproc N``), or whatever ``torchrun``
started (``--nnodes`` for a site that is a small cluster).

Rank 0 is the site as the federation sees it: it runs the SuperNode and the site worker,
talks to the coordinator, and hands each plan to the other ranks before answering it
(:class:`LeaderSite`). The other ranks never open a connection: they wait for plans from
rank 0 (:func:`follow`), train their share of every batch with it and save their own state.
How the processes share the work is :mod:`atoll.train.distributed`'s business; the site and
the coordinator only see one site.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

STOP = ("stop", b"")  # what rank 0 hands the others when the site shuts down


class LeaderSite:
    """Rank 0's site, as the site worker serves it: each plan goes to every rank first."""

    def __init__(self, site: Any) -> None:
        self.site = site

    overlap_steps = property(lambda self: self.site.overlap_steps)

    def answer(self, head: dict[str, Any], blob: bytes) -> tuple[dict[str, Any], bytes]:
        """Hand the plan to the other ranks, then answer it with them (an evaluation
        request rank 0 answers alone)."""
        if head.get("type") != "EvalRequest":
            self.site.parallel.broadcast((head, blob))
        return self.site.answer(head, blob)

    def train_ahead(self, max_steps: int, stop: Any) -> None:
        """Never called: a site of several processes trains no steps ahead."""
        raise RuntimeError("a site of several processes does not train ahead")

    def stop_followers(self) -> None:
        """Tell the other ranks the site is shutting down."""
        self.site.parallel.broadcast(STOP)


def follow(site: Any, log: Callable[[str], None]) -> int:
    """A rank other than 0: answer every plan rank 0 hands over, until it says stop."""
    par = site.parallel
    while True:
        head, blob = par.broadcast(None)
        if (head, blob) == STOP:
            return 0
        try:
            site.answer(head, blob)
        except Exception as e:  # noqa: BLE001 - rank 0 meets the same error and reports it
            log(f"site {site.name} rank {par.rank}: {type(e).__name__}: {e}")


def launch(nproc: int, main: Callable[..., int], *args: Any) -> int:
    """Run ``main(*args)`` in ``nproc`` processes on this machine, as ``torchrun
    --nproc-per-node`` would start them; rank 0's exit status."""
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_rank, args=(nproc, port, main, args), nprocs=nproc)
    except mp.ProcessExitedException as e:
        return e.exit_code or 1
    return 0


def _rank(rank: int, world: int, port: int, main: Callable[..., int], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    code = main(*args)
    if code:
        sys.exit(code)
