"""The contribution ledger: an append-only, hash-chained, signed SQLite table.

Every entry stores the hash of the one before it and the coordinator's Ed25519 signature of
its own hash::

    hash_n = sha256("seq \\n kind \\n round \\n hash_{n-1} \\n body")

so editing a row changes its hash (its signature and the next row's ``prev`` no longer
match), deleting or reordering rows breaks the ``prev`` links, and nobody without the
coordinator's key can produce a consistent replacement. The first entry (``genesis``) names
that key; ``ledger.head`` beside the database holds the signed hash of the last entry, so
cutting entries off the end is noticed too. The head is written after its entry is committed;
a crash between the two leaves it one entry behind, and reopening the ledger moves it on
(only then, and only over a chain that checks out under the coordinator's own key). Triggers
refuse UPDATE and DELETE, which stops accidents; the chain is what stops anyone else.

Bodies are canonical JSON holding contributor ids, hashes and numbers, never raw text.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atoll.ledger.signing import Signer, verify
from atoll.util.atomic import write_atomic

ZERO = "0" * 64
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    round INTEGER NOT NULL,
    body TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""


def canonical(body: dict[str, Any]) -> str:
    """The one JSON text of ``body`` that is hashed and stored."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def entry_hash(seq: int, kind: str, round_: int, prev: str, body: str) -> str:
    """The SHA-256 that chains an entry to the one before: over its number, kind, round,
    the previous hash and the body's canonical text."""
    return hashlib.sha256(f"{seq}\n{kind}\n{round_}\n{prev}\n{body}".encode()).hexdigest()


@dataclass
class Entry:
    """One ledger entry as stored: its place in the chain, body, hash and signature."""

    seq: int
    kind: str
    round: int
    body: dict[str, Any]
    prev: str
    hash: str
    signature: str
    text: str = ""
    """The body exactly as stored and hashed."""


class Ledger:
    """Appends signed entries to ``path`` (a SQLite file). Only the coordinator writes."""

    def __init__(self, path: str | Path, signer: Signer) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.signer = signer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.executescript(SCHEMA)
        last = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1"
                                ).fetchone()
        self._seq, self._prev = last if last else (0, ZERO)
        if self._seq:
            self._repair_head()

    def _repair_head(self) -> None:
        """Re-sign the head at the last entry when a crash left it exactly one behind."""
        head = _read_head(self.head_path)
        if head is not None and head.get("seq") == self._seq:
            return
        entries = read_entries(self.path)
        if _check_chain(entries, self.signer.public) is not None:
            return  # a broken chain is for verify_ledger to report, not to paper over
        before = entries[-2] if len(entries) > 1 else None
        if head is None and before is not None:
            return  # a missing head could hide a truncation: only verify can say
        if head is not None and (before is None or head.get("seq") != before.seq
                                 or not head_signed(self.signer.public, head, before.hash)):
            return
        self._write_head(self._seq, self._prev)

    def _write_head(self, seq: int, h: str) -> None:
        head = {"seq": seq, "hash": h, "signature": self.signer.sign(_head_bytes(seq, h))}
        write_atomic(self.head_path, canonical(head).encode())

    def append(self, kind: str, round_: int, body: dict[str, Any]) -> Entry:
        """Add one entry at the end of the chain and move the signed head to it."""
        seq, text = self._seq + 1, canonical(body)
        h = entry_hash(seq, kind, round_, self._prev, text)
        entry = Entry(seq, kind, round_, body, self._prev, h, self.signer.sign(h.encode()),
                      text)
        with self._db:
            self._db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (seq, kind, round_, text, entry.prev, h, entry.signature))
        self._seq, self._prev = seq, h
        self._write_head(seq, h)  # after the commit: a crash leaves it behind, never ahead
        return entry

    def head(self) -> dict[str, Any] | None:
        """The signed head (last entry's number and hash, signed) as the head file holds it:
        what every plan carries, so that sites keep evidence of the history (None: empty)."""
        return _read_head(self.head_path) if self._seq else None

    @property
    def empty(self) -> bool:
        """Whether nothing has been appended yet (a new run writes its genesis entry)."""
        return self._seq == 0

    def close(self) -> None:
        """Close the ledger database."""
        self._db.close()


def _head_bytes(seq: int, h: str) -> bytes:
    return f"head {seq} {h}".encode()


def _read_head(path: Path) -> dict[str, Any] | None:
    """The head file's record, or None when it is missing or unreadable."""
    try:
        head = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


def head_signed(key: str, head: dict[str, Any], h: str) -> bool:
    """Whether ``head`` is ``key``'s signed head at the entry whose hash is ``h``."""
    try:
        return head["hash"] == h and verify(key, _head_bytes(int(head["seq"]), h),
                                            str(head["signature"]))
    except (KeyError, TypeError, ValueError):
        return False


def read_entries(path: str | Path) -> list[Entry]:
    """Every row of the ledger at ``path``, in stored order (nothing checked)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no ledger here")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT seq, kind, round, body, prev, hash, signature FROM entries "
                          "ORDER BY rowid").fetchall()
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path}: not a ledger ({e})") from None
    finally:
        db.close()
    out = []
    for seq, kind, round_, body, prev, h, sig in rows:
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError:
            parsed = {"__unreadable__": body}
        out.append(Entry(seq, kind, round_, parsed, prev, h, sig, body))
    return out


@dataclass
class Verdict:
    """What checking a ledger found: ok, or the first bad entry and why."""

    ok: bool
    entries: int
    bad_seq: int | None = None
    reason: str = ""
    read: list[Entry] = field(default_factory=list, repr=False)
    """The entries as read and checked (for the caller to use without reading again)."""

    def __str__(self) -> str:
        if self.ok:
            return f"ledger ok: {self.entries} entries, chain and signatures intact"
        return f"ledger entry {self.bad_seq}: {self.reason}"


def verify_ledger(path: str | Path, public: str | None = None) -> Verdict:
    """Check the whole chain: links, hashes, signatures and the signed head.

    ``public`` (hex) is the coordinator key to trust; by default the genesis entry's."""
    entries = read_entries(path)
    verdict = _check(path, entries, public)
    verdict.read = entries
    return verdict


def _check(path: str | Path, entries: list[Entry], public: str | None) -> Verdict:
    broken = _check_chain(entries, public)
    if broken is not None:
        return broken
    return _check_head(path, entries)


def _check_chain(entries: list[Entry], public: str | None) -> Verdict | None:
    """The first broken link, hash or signature of ``entries``; None when all hold."""
    if not entries:
        return Verdict(False, 0, 1, "the ledger is empty (no genesis entry)")
    first = entries[0]
    key = first.body.get("coordinator_key") if first.kind == "genesis" else None
    if key is None:
        return Verdict(False, len(entries), first.seq, "the first entry is not a genesis entry")
    if public is not None and public != key:
        return Verdict(False, len(entries), first.seq,
                       "signed by a different coordinator key than the one given")
    prev = ZERO
    for i, e in enumerate(entries, start=1):
        if e.seq != i:
            return Verdict(False, len(entries), e.seq,
                           f"out of place: found at position {i} (deleted or reordered)")
        if e.prev != prev:
            return Verdict(False, len(entries), e.seq, "does not link to the entry before "
                           "it (an earlier entry was edited, deleted or reordered)")
        if entry_hash(e.seq, e.kind, e.round, e.prev, e.text) != e.hash:
            return Verdict(False, len(entries), e.seq, "its content does not match its hash "
                           "(edited)")
        if not verify(key, e.hash.encode(), e.signature):
            return Verdict(False, len(entries), e.seq, "bad signature")
        prev = e.hash
    return None


def _check_head(path: str | Path, entries: list[Entry]) -> Verdict:
    """Whether the signed head names the chain's last entry (nothing cut off the end)."""
    key = entries[0].body["coordinator_key"]
    head_path = Path(path).with_name(Path(path).name + ".head")
    last = entries[-1]
    try:
        head = json.loads(head_path.read_text())
        signed = verify(key, _head_bytes(head["seq"], head["hash"]), head["signature"])
        seq = int(head["seq"])
    except (OSError, ValueError, KeyError, TypeError):
        return Verdict(False, len(entries), last.seq + 1, f"{head_path.name} (the signed "
                       "last entry) is missing or unreadable: cannot tell if entries were "
                       "cut off the end")
    if not signed:
        return Verdict(False, len(entries), last.seq + 1, f"{head_path.name} has a bad "
                       "signature")
    if seq > last.seq:
        return Verdict(False, len(entries), last.seq + 1, f"missing: the chain ends at "
                       f"entry {last.seq} but the signed head names entry {seq} (entries "
                       f"were cut off the end)")
    if seq != last.seq or head["hash"] != last.hash:
        return Verdict(False, len(entries), seq, "does not match the signed head")
    return Verdict(True, len(entries))
