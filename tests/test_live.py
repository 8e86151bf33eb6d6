"""The live view: each site's state from the status board, the totals, and plain lines where
output is not a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from atoll.app.live import Tally, render, site_states
from atoll.app.progress import Progress
from atoll.app.status import StatusBoard


def board(tmp_path, seen: list | None = None) -> StatusBoard:
    b = StatusBoard(tmp_path, total_rounds=10, steps_per_round=3,
                    listener=None if seen is None else seen.append)
    b.sites(["a", "b", "c", "d", "e"])
    b.round_started(1, ["a", "b", "c", "d"])
    b.stepped("a", 1, 2.5)
    b.stepped("b", 3, 2.4)
    b.reported("c", True, "loss 2.3000, 6144 tokens")
    b.reported("d", False, "undecodable update: bad magic")
    return b


def test_site_states_follow_the_round(tmp_path):
    states = site_states(board(tmp_path).state)
    assert states == {"a": "training", "b": "sending", "c": "sent", "d": "refused",
                      "e": "idle"}
    b = board(tmp_path)
    b.reported("a", False, "no reply within the 60s deadline")
    assert site_states(b.state)["a"] == "late"


def test_render_shows_round_sites_bytes_and_eta(tmp_path):
    b = board(tmp_path)
    record = {"round": 1, "tokens": 6144, "bytes_up": 2_000_000, "bytes_down": 3_000_000,
              "dp_bytes": 100_000_000, "seconds": 2.0, "sites": ["c"], "rejected": {"d": "x"},
              "val_loss": {"code": 2.0, "prose": 3.0}}
    b.round_closed(record)
    b.round_started(2, ["a"])
    tally = Tally()
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(render(b.state, tally, "demo"))
    shown = console.export_text()
    assert "round 2/10" in shown and "5.0 MB on the wire" in shown
    assert "data-parallel: 100 MB, 20x" in shown and "ETA" in shown
    assert "last closed round 1: sites c  val 2.5000  refused d" in shown
    console.print(render(b.state, tally, "demo"))  # the same round is counted once
    assert tally.moved() == (5_000_000, 100_000_000)


def test_progress_is_plain_lines_off_a_terminal(tmp_path):
    out = io.StringIO()
    p = Progress(out, interval_s=0.0)
    board_ = StatusBoard(tmp_path, 3, listener=p.status)
    board_.round_started(1, ["a"])
    p.log("round 1/3")
    p.close()
    assert out.getvalue() == "round 1/3\n"  # no live view, no escape codes


def test_progress_live_view_when_asked(tmp_path):
    out = io.StringIO()
    p = Progress(out, live=True)
    seen: list = []
    board(tmp_path, seen)
    for state in seen:
        p.status(state)
    p.log("a line that stays")
    p.close()
    text = out.getvalue()
    assert "a line that stays" in text and "sending" in text and "refused" in text
