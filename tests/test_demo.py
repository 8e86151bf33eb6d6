"""The demo itself: four non-IID sites end within 5% of the centralised data-parallel baseline.

This runs the real ``atoll demo`` configuration (minutes on 2 cores); what it measured is
recorded in BENCHMARKS.md, with the command, rather than here where it would go stale.
"""

from __future__ import annotations

import pytest

from atoll.app.metrics import read_metrics
from atoll.cli import main


@pytest.mark.slow
def test_demo_federation_within_5_percent_of_centralised(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATOLL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    # one thread: the suite runs on two workers, one a core, and two torch threads on a
    # shared core spin against each other (the test then took 5x as long)
    assert main(["demo", "--out", str(out), "threads=1"]) == 0
    final = {}
    for r in read_metrics(out / "metrics.jsonl"):
        if r["kind"] == "round" and r.get("val_loss"):
            final[r["run"]] = r
    fed, base = final["federation"], final["baseline:data_parallel"]
    assert fed["round"] == base["round"] == 32
    assert fed["tokens"] == base["tokens"]  # equal tokens
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(fed["val_loss"]) <= 1.05 * mean(base["val_loss"])
    rounds = [r for r in read_metrics(out / "metrics.jsonl")
              if r["kind"] == "round" and r["run"] == "federation"]
    moved = sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
    assert sum(r["dp_bytes"] for r in rounds) >= 20 * moved  # at least 20x fewer bytes
    printed = capsys.readouterr().out
    assert "x fewer bytes" in printed and "a bare training step here" in printed
    assert "sample from the federated model" in printed and "baseline:data_parallel" in printed
    assert main(["ledger", "verify", str(out)]) == 0  # 32 rounds of signed, chained entries
    assert main(["shares", str(out)]) == 0
    assert "shares sum to 1.0000" in capsys.readouterr().out
