"""Following a run from outside its process: new round lines and site changes, as they land.

``atoll coordinator`` runs the federation in Flower's ServerApp process; the console it was
started from reads the run folder (``status.json``, ``metrics.jsonl``) to say what happens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from atoll.app.metrics import mean_loss, read_metrics


class RunFollower:
    """Each :meth:`poll` logs what the run folder gained since the last one."""

    def __init__(self, out: Path, log: Callable[[str], None] = print,
                 status: Callable[[dict], None] | None = None) -> None:
        self.out = Path(out)
        self.log = log
        self.status = status
        """Given the run's status board on every poll (the console's live view)."""
        self._seen_rounds = 0
        self._seen_sites: list[str] | None = None

    def poll(self) -> None:
        """Log newly connected sites and newly closed rounds."""
        connected = self._connected()
        if connected is not None and connected != self._seen_sites:
            self._seen_sites = connected
            self.log(f"connected sites: {', '.join(connected) or 'none yet'}")
        rounds = [r for r in read_metrics(self.out / "metrics.jsonl")
                  if r["kind"] == "round" and r["round"] > 0]
        for r in rounds[self._seen_rounds:]:
            self.log(round_line(r))
        self._seen_rounds = max(self._seen_rounds, len(rounds))

    def _connected(self) -> list[str] | None:
        status_file = self.out / "status.json"
        if not status_file.exists():
            return None
        try:
            state = json.loads(status_file.read_text())
            connected = state["connected"]
        except (ValueError, KeyError):
            return None
        if self.status is not None:
            self.status(state)
        return connected


def round_line(r: dict) -> str:
    """One closed round of ``metrics.jsonl`` as a console line."""
    val = r.get("val_loss") or {}
    v = f"  val {mean_loss(val):.4f}" if val else ""
    rej = f"  rejected {sorted(r['rejected'])}" if r.get("rejected") else ""
    loss = r.get("train_loss")
    return (f"round {r['round']}: sites {', '.join(r['sites']) or 'none'}  train "
            f"{'-' if loss is None else f'{loss:.4f}'}{v}{rej}  {r['seconds']:.1f}s")
