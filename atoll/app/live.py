"""The live view of a running federation on a terminal: rounds, each site's state, speed,
bytes and the time left, redrawn in place (``rich``).

It is drawn from the run's status board (``status.json``: who trains, who reported, the last
closed round), so the same view serves ``atoll simulate`` in its own process and the console
of ``atoll coordinator``, which reads the run folder. Where output is not a terminal (CI, a
file) nothing here runs: plain lines are printed instead (:mod:`atoll.app.progress`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from atoll.app.metrics import mean_loss

STATE_STYLE = {"training": "cyan", "sending": "blue", "sent": "green", "waiting": "dim",
               "late": "yellow", "refused": "bold red", "idle": "dim"}


def site_states(state: dict[str, Any]) -> dict[str, str]:
    """Each site's state in the current round: ``training`` (stepping), ``sending`` (its
    steps done, its update not yet in), ``sent`` (accepted, waiting for the others),
    ``refused`` (its update rejected), ``late`` (no reply in time), ``waiting`` (in the round,
    no step seen yet) or ``idle`` (connected, not in this round)."""
    steps = state.get("steps_per_round") or 0
    training = state.get("training") or {}
    out: dict[str, str] = {}
    for site in state.get("connected") or []:
        out[site] = "idle"
    for site in state.get("waiting_for") or []:
        done = training.get(site, {}).get("step", 0)
        out[site] = "sending" if steps and done >= steps else "training" if done else "waiting"
    for site, r in (state.get("reported") or {}).items():
        late = "deadline" in r["detail"] or "no reply" in r["detail"]
        out[site] = "sent" if r["ok"] else "late" if late else "refused"
    return out


@dataclass
class Tally:
    """What the closed rounds add up to, counted once per round however often it is shown."""

    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    first_round: int | None = None

    def add(self, record: dict[str, Any] | None) -> None:
        """Count a closed round's record (again: ignored)."""
        if not record or record.get("round", 0) <= 0 or record["round"] in self.rounds:
            return
        if self.first_round is None:
            self.first_round, self.started = record["round"] - 1, time.monotonic()
        self.rounds[record["round"]] = record

    def moved(self) -> tuple[float, float]:
        """Bytes the federation moved, and data-parallel training's at equal tokens."""
        rs = self.rounds.values()
        return (sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in rs),
                sum(r.get("dp_bytes", 0) for r in rs))

    def tokens_per_second(self) -> float:
        """Tokens trained per second of wall time over the rounds this view has seen."""
        rs = sorted(self.rounds.values(), key=lambda r: r["round"])
        seconds = sum(r.get("seconds", 0.0) for r in rs[1:])
        return (rs[-1]["tokens"] - rs[0]["tokens"]) / seconds if seconds else 0.0

    def eta_s(self, total_rounds: int) -> float | None:
        """Seconds left at the pace of the rounds seen so far (None before one is seen)."""
        if not self.rounds or self.first_round is None:
            return None
        last = max(self.rounds)
        done = last - self.first_round
        return (time.monotonic() - self.started) / done * max(0, total_rounds - last)


def render(state: dict[str, Any], tally: Tally, title: str = "atoll") -> Group:
    """The view: a headline, a row per site and the last closed round."""
    tally.add(state.get("last_round"))
    moved, dp = tally.moved()
    eta = tally.eta_s(state.get("rounds", 0))
    head = Text.assemble(
        (f"{title}  ", "bold"), f"round {state.get('round', 0)}/{state.get('rounds', 0)}  ",
        f"{state.get('phase', '')}  ", f"{tally.tokens_per_second():,.0f} tokens/s  ",
        f"{moved / 1e6:,.1f} MB on the wire",
        f" (data-parallel: {dp / 1e6:,.0f} MB, {dp / moved:.0f}x)" if dp and moved else "",
        f"  ETA {_duration(eta)}" if eta is not None else "")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("site", "state", "step", "loss", "last report"):
        table.add_column(column)
    steps = state.get("steps_per_round") or 0
    training = state.get("training") or {}
    reported = state.get("reported") or {}
    for site, st in sorted(site_states(state).items()):
        t = training.get(site, {})
        table.add_row(site, Text(st, style=STATE_STYLE.get(st, "")),
                      f"{t['step']}/{steps or '?'}" if t else "",
                      f"{t['loss']:.3f}" if t else "",
                      reported.get(site, {}).get("detail", ""))
    return Group(head, table, Text(_last_round(state.get("last_round")), style="dim"))


def _last_round(r: dict[str, Any] | None) -> str:
    """A line about the last closed round."""
    if not r or not r.get("round"):
        return ""
    val = r.get("val_loss") or {}
    rejected = r.get("rejected") or {}
    return (f"last closed round {r['round']}: sites {', '.join(r.get('sites', [])) or 'none'}"
            + (f"  val {mean_loss(val):.4f}" if val else "")
            + (f"  refused {', '.join(sorted(rejected))}" if rejected else ""))


def _duration(seconds: float) -> str:
    """``seconds`` as ``1m05s`` (or ``42s``)."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
