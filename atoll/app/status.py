"""``status.json`` and ``atoll status DIR``: who is connected, the round, who has reported.

The coordinator rewrites the file (atomically) whenever something changes, so any process,
on any terminal, can read where a run stands without talking to the coordinator.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atoll.util.atomic import write_atomic

FILE = "status.json"


class StatusBoard:
    """The live state of a run, written to ``<run>/status.json`` on every change."""

    def __init__(self, run_dir: Path, total_rounds: int, round_: int = 0,
                 last_round: dict[str, Any] | None = None, steps_per_round: int = 0,
                 listener: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(run_dir) / FILE
        self.listener = listener
        """Called with the state after every change (a live display)."""
        self.state: dict[str, Any] = {
            "phase": "starting", "round": round_, "rounds": total_rounds, "connected": [],
            "waiting_for": [], "reported": {}, "last_round": last_round,
            "steps_per_round": steps_per_round, "training": {}, "updated": time.time()}
        self._written = 0.0
        self._lock = threading.RLock()  # sites of a parallel simulation step in threads
        self._flush()

    def sites(self, connected: list[str]) -> None:
        """Record which sites are connected now."""
        self.state["connected"] = sorted(connected)
        self._flush()

    def round_started(self, round_: int, sites: list[str]) -> None:
        """Round ``round_`` is training at ``sites``; nobody has reported yet."""
        self.state.update(phase="training", round=round_, waiting_for=sorted(sites),
                          reported={}, training={})
        self._flush()

    def stepped(self, site: str, step: int, loss: float) -> None:
        """Site ``site`` took inner step ``step`` of the round (training loss ``loss``): shown
        at once, written to the file at most once a second."""
        with self._lock:
            self.state["training"][site] = {"step": step, "loss": loss}
            self._flush(at_most_every_s=1.0)

    def reported(self, site: str, ok: bool, detail: str) -> None:
        """Site ``site`` reported (``ok`` or not, with a short ``detail``)."""
        with self._lock:
            self.state["reported"][site] = {"ok": ok, "detail": detail}
            self.state["waiting_for"] = [s for s in self.state["waiting_for"] if s != site]
            self._flush()

    def round_closed(self, summary: dict[str, Any]) -> None:
        """The round is closed; ``summary`` (losses, sites, rejections) is shown as the last."""
        self.state.update(phase="between rounds", waiting_for=[], last_round=summary)
        self._flush()

    def finished(self, phase: str = "finished") -> None:
        """The run is over (``phase``: how it ended)."""
        self.state["phase"] = phase
        self._flush()

    def _flush(self, at_most_every_s: float = 0.0) -> None:
        with self._lock:
            now = self.state["updated"] = time.time()
            if self.listener is not None:
                self.listener(self.state)
            if now - self._written >= at_most_every_s:
                write_atomic(self.path, json.dumps(self.state, indent=1).encode())
                self._written = now


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """The state a run's coordinator last wrote to ``status.json``."""
    path = Path(run_dir) / FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no {FILE} (not a run folder, or not started yet)")
    return json.loads(path.read_text())


def format_status(state: dict[str, Any]) -> str:
    """A few human lines about ``state``."""
    age = time.time() - state["updated"]
    lines = [f"phase: {state['phase']} (updated {age:.0f}s ago)",
             f"round: {state['round']}/{state['rounds']}",
             f"connected sites ({len(state['connected'])}): "
             f"{', '.join(state['connected']) or 'none'}"]
    if state["waiting_for"]:
        lines.append(f"waiting for: {', '.join(state['waiting_for'])}")
    for site, r in sorted(state["reported"].items()):
        lines.append(f"  {site}: {'ok' if r['ok'] else 'FAILED'} {r['detail']}")
    last = state.get("last_round")
    if last:
        val = last.get("val_loss") or {}
        vals = "  ".join(f"{k} {v:.3f}" for k, v in sorted(val.items()))
        train = last.get("train_loss")
        lines.append(f"last closed round {last['round']}: train loss "
                     f"{train if train is None else round(train, 4)}; sites "
                     f"{', '.join(last.get('sites', [])) or 'none'}"
                     + (f"; validation {vals}" if vals else ""))
        for site, why in (last.get("rejected") or {}).items():
            lines.append(f"  rejected {site}: {why}")
    return "\n".join(lines)
