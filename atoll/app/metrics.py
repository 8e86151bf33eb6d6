"""``metrics.jsonl``: one JSON object per event, appended and flushed as the run goes.

Every record has ``kind`` (``site``, ``round``, ``eval``), ``run`` (``federation`` or
``baseline:<kind>``) and ``round``. On resume the file is cut back to the checkpointed round,
so a resumed run's metrics read exactly like an uninterrupted run's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atoll.util.atomic import write_atomic

FEDERATION = "federation"
"""The ``run`` of the federation's records (a baseline's is ``baseline:<kind>``)."""


def mean_loss(losses: dict[str, float]) -> float:
    """The plain mean over domains (each domain counts alike): the one figure every report
    quotes for a run's validation loss."""
    return sum(losses.values()) / len(losses)


def final_losses(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The last validation losses of each run (federation, baselines) among ``records``."""
    last: dict[str, dict[str, float]] = {}
    for rec in records:
        if rec["kind"] == "round" and rec.get("val_loss"):
            last[rec["run"]] = rec["val_loss"]
    return last


class MetricsLog:
    """Appends the run's records to ``metrics.jsonl``, one JSON line each, as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        """Called with each record once it is written (the run's trackers)."""

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line (keys sorted), flushed at once so a crash loses no
        earlier record; then hand it to the listeners."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        for listener in self.listeners:
            listener(record)

    def truncate_after(self, round_: int) -> None:
        """Drop records of rounds after ``round_`` (an interrupted round is run again)."""
        kept = [r for r in read_metrics(self.path) if r.get("round", 0) <= round_]
        write_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                        for r in kept).encode())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``; a torn last line (crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record") from None
    return out
