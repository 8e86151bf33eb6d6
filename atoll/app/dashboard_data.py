"""What the dashboard shows, read from a run folder: one JSON document per refresh.

Everything comes from files the coordinator already writes (``status.json``,
``metrics.jsonl``, the ledger), so the dashboard needs no connection to the coordinator and
can never change the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from atoll.app.live import site_states
from atoll.app.metrics import FEDERATION, read_metrics


def dashboard_state(run_dir: str | Path, shares_cache: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The run's state for the page: status, per-site state, validation curves per run and
    domain, bytes against data-parallel training, refused updates, privacy and shares."""
    run_dir = Path(run_dir)
    status = _read_json(run_dir / "status.json")
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() \
        else []
    rounds = [r for r in records if r["kind"] == "round"]
    fed = [r for r in rounds if r["run"] == FEDERATION and r["round"] > 0]
    curves: dict[str, list[dict[str, Any]]] = {}
    for r in rounds:
        if r.get("val_loss"):
            curves.setdefault(r["run"], []).append(
                {"round": r["round"], "tokens": r["tokens"], "val_loss": r["val_loss"]})
    return {
        "name": _read_json(run_dir / "run.json").get("name", run_dir.name),
        "status": status, "sites": site_states(status) if status else {},
        "curves": curves, "bytes": _bytes(fed), "rejected": [
            {"round": r["round"], "site": s, "reason": why}
            for r in fed for s, why in (r.get("rejected") or {}).items()] + [
            {"round": r["round"], "site": s, "reason": f"evaluation report: {why}"}
            for r in rounds if r["run"] == FEDERATION
            for s, why in (r.get("eval_refused") or {}).items()],
        "privacy": _privacy(fed), "shares": _shares(run_dir, shares_cache)}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file the coordinator rewrites atomically; empty while it does not exist."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _bytes(fed: list[dict]) -> list[dict[str, float]]:
    """Cumulative bytes up, down and data-parallel's at equal tokens, round by round."""
    out, up, down, dp = [], 0.0, 0.0, 0.0
    for r in fed:
        up += r.get("bytes_up", 0)
        down += r.get("bytes_down", 0)
        dp += r.get("dp_bytes", 0)
        out.append({"round": r["round"], "up": up, "down": down, "dp": dp})
    return out


def _privacy(fed: list[dict]) -> dict[str, Any] | None:
    """The privacy budget spent so far (None without differential privacy)."""
    spent = [r for r in fed if r.get("epsilon") is not None]
    if not spent:
        return None
    eps = spent[-1]["epsilon"]  # infinite once a round after private ones had no noise
    return {"epsilon": eps if math.isfinite(eps) else "unbounded", "delta": spent[-1]["delta"],
            "rounds": len(spent)}


def _shares(run_dir: Path, cache: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Contributors' shares from the ledger, recomputed only when the ledger file changes."""
    from atoll.app.books import LEDGER
    from atoll.ledger.chain import read_entries
    from atoll.ledger.credit import shares

    path = run_dir / LEDGER
    if not path.exists():
        return []
    # the head file is rewritten with every entry (the database may write to its journal)
    key = ":".join(f"{p.stat().st_mtime_ns}:{p.stat().st_size}"
                   for p in (path, path.with_name(path.name + ".head")) if p.exists())
    if cache is not None and cache.get("key") == key:
        return cache["shares"]
    try:
        table = [{"contributor": s.contributor, "sites": s.sites, "tokens": s.tokens,
                  "share": s.share} for s in shares(read_entries(path))]
    except Exception:  # noqa: BLE001 (a ledger being written: shown on the next refresh)
        return cache.get("shares", []) if cache else []
    if cache is not None:
        cache.update(key=key, shares=table)
    return table
