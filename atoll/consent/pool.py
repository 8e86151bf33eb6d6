"""A site's data pool: contributions, each with the consent its contributor gave.

A pool is a prepared data directory (the same ``manifest.json`` + shards a site trains from)
plus ``consent.sqlite``, the record of who contributed what and for which purposes::

    POOL/consent.sqlite                 contributions, purposes, expiry, revocation
    POOL/manifest.json                  one source per contribution (rewritten atomically)
    POOL/contributions/<id>/            that contribution's token rows (atoll prepare)

``atoll contribute`` tokenises one file into its own directory, then rewrites the manifest,
then records the contribution: a crash at any point leaves the pool as it was, or leaves rows
that no consent record covers (which are never read). An exact duplicate (same SHA-256) or a
near-duplicate (MinHash, :mod:`atoll.consent.minhash`) of a live contribution is recorded
with ``duplicate_of`` and gets no rows: it is neither trained on nor credited twice.

The consent is enforced where tokens are read (:func:`consent_filter`), once per round; a
revoked contribution's rows are overwritten with zeros the next time its site starts a round.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atoll.consent.minhash import NEAR_DUPLICATE, signature, similarity
from atoll.data.prepare import FORMAT, PrepareOptions, file_sha256, prepare
from atoll.data.sources import DataError, read_documents
from atoll.tokenizer import load_tokenizer
from atoll.util.atomic import write_atomic

DB = "consent.sqlite"
LOCK = ".pool.lock"
PURPOSES = ("pretraining", "research", "commercial")  # the usual ones; any word is accepted
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contributions (
    id TEXT PRIMARY KEY, contributor TEXT NOT NULL, sha256 TEXT NOT NULL,
    tokens INTEGER NOT NULL, documents INTEGER NOT NULL, purposes TEXT NOT NULL,
    expires TEXT NOT NULL, added_at REAL NOT NULL, revoked_at REAL, erased_at REAL,
    duplicate_of TEXT, similarity REAL, source INTEGER, minhash BLOB NOT NULL
);
"""


@dataclass
class Contribution:
    """One contributor's file at a site and the consent that comes with it (a row of
    ``consent.sqlite``)."""

    id: str
    contributor: str
    sha256: str
    tokens: int
    documents: int
    purposes: list[str]
    expires: str
    """ISO date (UTC midnight) from which the consent no longer holds; empty = never."""
    added_at: float
    revoked_at: float | None
    erased_at: float | None
    duplicate_of: str | None
    similarity: float | None
    source: int | None
    """Its source index in the pool's manifest (None for a duplicate)."""

    def allows(self, purpose: str, now: float) -> bool:
        """Whether its rows may be read now for ``purpose``."""
        if self.revoked_at is not None or self.duplicate_of is not None:
            return False
        if self.expires and now >= _date(self.expires).timestamp():
            return False
        return purpose in self.purposes


def _date(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"expiry date {text!r} is not an ISO date such as 2027-01-31") from None


class Pool:
    """The contributions held at one site, and the consent that goes with each."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not is_pool(self.root):
            raise DataError(self.root, f"not a data pool (no {DB}): make one with "
                            "atoll contribute")
        self._db = sqlite3.connect(self.root / DB)
        self.settings = dict(self._db.execute("SELECT key, value FROM settings"))

    @classmethod
    def open_or_create(cls, root: str | Path, seq_len: int = 128, tokenizer: str = "",
                       val_fraction: float = 0.05) -> Pool:
        """The pool in ``root``, made empty first (with this row length and tokenizer) if there
        is none; refuses a prepared data directory that is not a pool."""
        root = Path(root)
        if not is_pool(root):
            if (root / "manifest.json").exists():
                raise DataError(root, "is prepared data, not a pool; contribute into a new "
                                "directory")
            root.mkdir(parents=True, exist_ok=True)
            tok = load_tokenizer(tokenizer)
            dtype = np.dtype(np.uint16 if len(tok) <= 1 << 16 else np.uint32)
            manifest = {"format": FORMAT, "pool": True, "tokenizer": tokenizer or "bytes",
                        "vocab_size": len(tok), "eot_id": tok.eos_token_id, "seq_len": seq_len,
                        "dtype": dtype.name, "val_fraction": val_fraction, "sources": [],
                        "splits": {s: {"rows": 0, "shards": []} for s in ("train", "val")}}
            write_atomic(root / "manifest.json", json.dumps(manifest, indent=1).encode())
            db = sqlite3.connect(root / f".{DB}.new")
            db.executescript(SCHEMA)
            db.executemany("INSERT INTO settings VALUES (?, ?)", [
                ("seq_len", str(seq_len)), ("tokenizer", tokenizer),
                ("val_fraction", str(val_fraction))])
            db.commit()
            db.close()
            (root / f".{DB}.new").rename(root / DB)
        return cls(root)

    def contributions(self) -> list[Contribution]:
        """Every contribution, live or not, in the order they were added."""
        rows = self._db.execute(
            "SELECT id, contributor, sha256, tokens, documents, purposes, expires, added_at, "
            "revoked_at, erased_at, duplicate_of, similarity, source FROM contributions "
            "ORDER BY added_at, id").fetchall()
        return [Contribution(*r[:5], r[5].split(","), *r[6:]) for r in rows]

    def contribute(self, contributor: str, file: str | Path, allow: list[str],
                   expires: str = "", text_field: str = "text",
                   log: Callable[[str], None] = print) -> Contribution:
        """Register ``file`` as ``contributor``'s contribution, usable for ``allow``."""
        file = Path(file)
        if not _WORD.match(contributor):
            raise ValueError(f"contributor id {contributor!r}: use letters, digits, . _ @ -")
        bad = [p for p in allow if not _WORD.match(p)]
        if not allow or bad:
            raise ValueError(f"--allow needs one or more purposes such as "
                             f"{','.join(PURPOSES)}; got {','.join(allow) or 'none'}")
        if expires:
            _date(expires)
        if not file.is_file():
            raise DataError(file, "no such file")
        with self._exclusive():
            return self._add(contributor, file, allow, expires, text_field, log)

    def _add(self, contributor: str, file: Path, allow: list[str], expires: str,
             text_field: str, log: Callable[[str], None]) -> Contribution:
        """:meth:`contribute` for checked arguments, holding the pool's lock."""
        sha = file_sha256(file)
        text = "\n".join(read_documents(file, text_field))
        sig = signature(text)
        seq = self._db.execute("SELECT COUNT(*) FROM contributions").fetchone()[0] + 1
        cid = f"c{seq:05d}-{sha[:8]}"
        now = time.time()
        dup, sim = self._duplicate_of(sha, sig, now)
        source, tokens, docs = None, 0, 0
        if dup is None:
            sub = prepare([file], self.root / "contributions" / cid, PrepareOptions(
                seq_len=int(self.settings["seq_len"]), text_field=text_field,
                val_fraction=float(self.settings["val_fraction"]),
                tokenizer=self.settings["tokenizer"], contributor=contributor,
                record_paths=False), log=log)
            source = self._add_to_manifest(cid, sub)
            tokens, docs = sub["sources"][0]["tokens"], sub["sources"][0]["documents"]
        with self._db:
            self._db.execute(
                "INSERT INTO contributions VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?)",
                (cid, contributor, sha, tokens, docs, ",".join(allow), expires, now, dup, sim,
                 source, sig.tobytes()))
        return next(c for c in self.contributions() if c.id == cid)

    def _duplicate_of(self, sha: str, sig: np.ndarray, now: float
                      ) -> tuple[str | None, float | None]:
        """The live contribution this one repeats (exactly or nearly), if any."""
        live = self._db.execute("SELECT id, sha256, minhash FROM contributions WHERE "
                                "revoked_at IS NULL AND duplicate_of IS NULL").fetchall()
        for cid, other_sha, _ in live:
            if other_sha == sha:
                return cid, 1.0
        best = max(((similarity(sig, np.frombuffer(blob, np.uint32)), cid)
                    for cid, _, blob in live), default=(0.0, None))
        return (best[1], best[0]) if best[0] >= NEAR_DUPLICATE else (None, None)

    def _add_to_manifest(self, cid: str, sub: dict) -> int:
        manifest = json.loads((self.root / "manifest.json").read_text())
        source = len(manifest["sources"])
        info = dict(sub["sources"][0], id=source, contribution=cid)
        manifest["sources"].append(info)
        for split in ("train", "val"):
            for shard in sub["splits"][split]["shards"]:
                manifest["splits"][split]["shards"].append(
                    {"file": f"contributions/{cid}/{shard['file']}", "rows": shard["rows"],
                     "source": source})
            manifest["splits"][split]["rows"] += sub["splits"][split]["rows"]
        write_atomic(self.root / "manifest.json", json.dumps(manifest, indent=1).encode())
        return source

    def revoke(self, contributor: str, contribution: str = "") -> list[str]:
        """Withdraw ``contributor``'s consent (to one contribution, or all); their ids."""
        query = "SELECT id FROM contributions WHERE contributor = ? AND revoked_at IS NULL"
        args: tuple = (contributor,)
        if contribution:
            query, args = query + " AND id = ?", (contributor, contribution)
        with self._exclusive(), self._db:
            ids = [r[0] for r in self._db.execute(query, args)]
            self._db.executemany("UPDATE contributions SET revoked_at = ? WHERE id = ?",
                                 [(time.time(), i) for i in ids])
        return ids

    def erase_revoked(self) -> list[str]:
        """Overwrite the rows of revoked contributions with zeros (the shard files keep
        their size, so the pool's layout stays valid); the ids erased now."""
        with self._exclusive():
            return self._erase_revoked()

    def _erase_revoked(self) -> list[str]:
        todo = [c for c in self.contributions()
                if c.revoked_at is not None and c.erased_at is None]
        for c in todo:
            for shard in (self.root / "contributions" / c.id).glob("*.bin"):
                size = shard.stat().st_size
                with open(shard, "r+b") as f:
                    for start in range(0, size, 1 << 24):
                        f.write(bytes(min(1 << 24, size - start)))
                    f.flush()
                    os.fsync(f.fileno())  # erased on disk before the record says so
        with self._db:
            self._db.executemany("UPDATE contributions SET erased_at = ? WHERE id = ?",
                                 [(time.time(), c.id) for c in todo])
        return [c.id for c in todo]

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One writer at a time, across processes: two ``atoll contribute`` calls on one
        pool would otherwise each rewrite the manifest from the copy they read, and one
        contribution would be lost."""
        with open(self.root / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            yield

    def allowed_sources(self, purpose: str, now: float | None = None) -> set[int]:
        """The manifest sources whose consent covers ``purpose`` at time ``now``: the only
        rows a site may read for it."""
        now = time.time() if now is None else now
        return {c.source for c in self.contributions()
                if c.source is not None and c.allows(purpose, now)}

    def close(self) -> None:
        """Close the consent database."""
        self._db.close()


def is_pool(root: str | Path) -> bool:
    """Whether ``root`` is a data pool (has a consent database), not plain prepared data."""
    return (Path(root) / DB).exists()


def allowed_sources(data_dir: str | Path, purpose: str, now: float | None = None
                    ) -> set[int] | None:
    """Which sources of ``data_dir`` may be read for ``purpose`` now; None = all of them
    (plain prepared data: the site's own, with no contributor consent to honour). Revoked
    contributions' rows are erased on the way."""
    if not is_pool(data_dir):
        return None
    pool = Pool(data_dir)
    try:
        pool.erase_revoked()
        return pool.allowed_sources(purpose, now)
    finally:
        pool.close()


def consent_filter(data_dir: str | Path, purpose: str, now: float | None = None
                   ) -> Callable[[int], bool] | None:
    """:func:`allowed_sources` as a predicate for a reader (None: no filter)."""
    allowed = allowed_sources(data_dir, purpose, now)
    return None if allowed is None else allowed.__contains__
