"""The ledger heads a site has seen: its own evidence of what the ledger said, and when.

Every round's plan carries the coordinator's signed ledger head (the last entry's number
and hash, signed with the ledger key). A site appends each new head it receives to
``STATE/ledger-heads.jsonl``. A coordinator that later rewrites or cuts its ledger (and
re-signs a consistent chain with its own key, which ``atoll ledger verify`` alone cannot
tell from the truth) cannot take back what it signed: ``atoll ledger verify RUN --site-state
DIR`` checks each head the site holds against the ledger, and names the entry that is gone
or changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from atoll.ledger.chain import head_signed, read_entries

HEADS = "ledger-heads.jsonl"


def remember_head(state_dir: Path, run_id: str, round_: int, head: dict[str, Any] | None
                  ) -> None:
    """Append ``head`` (from round ``round_``'s plan) unless it is the last one kept."""
    if not isinstance(head, dict):
        return
    path = Path(state_dir) / HEADS
    record = {"run_id": run_id, "round": round_, "seq": head.get("seq"),
              "hash": head.get("hash"), "signature": head.get("signature")}
    last = _last_head(path)
    if last and {k: last.get(k) for k in ("run_id", "seq", "hash")} == \
            {k: record[k] for k in ("run_id", "seq", "hash")}:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        # after a crash mid-line, start a fresh line: the new head must not join the torn one
        f.write((b"\n" if torn else b"") + json.dumps(record, sort_keys=True).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _last_head(path: Path) -> dict[str, Any] | None:
    """The last head kept, reading only the file's end (it grows by a line a round)."""
    if not path.exists():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            head = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line, or the cut first one
        if isinstance(head, dict):
            return head
    return None


def read_heads(path: Path) -> list[dict[str, Any]]:
    """The heads in a ``ledger-heads.jsonl`` (a torn last line is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def check_heads(ledger: Path, state_dir: Path, run_id: str, public: str) -> list[str]:
    """What the site's heads say against the ledger: one line per head that the ledger no
    longer bears out (an empty list: every head is there, as signed)."""
    by_seq = {e.seq: e for e in read_entries(ledger)}
    problems = []
    for h in read_heads(Path(state_dir) / HEADS):
        if h.get("run_id") != run_id:
            continue
        seq, digest = h.get("seq"), str(h.get("hash"))
        if not isinstance(seq, int) or not head_signed(public, h, digest):
            problems.append(f"round {h.get('round')}: head {seq} not signed by the ledger key")
        elif seq not in by_seq:
            problems.append(f"round {h.get('round')}: the site saw entry {seq} "
                            f"(hash {digest[:12]}), which the ledger no longer has: "
                            f"its history was cut")
        elif by_seq[seq].hash != digest:
            problems.append(f"round {h.get('round')}: entry {seq} had hash {digest[:12]} "
                            f"when the site saw it, now {by_seq[seq].hash[:12]}: its history "
                            f"was rewritten")
    return problems
