"""The ledger's chain: any edit, deletion or reordering of a row is found and named."""

from __future__ import annotations

import sqlite3

import pytest

from atoll.ledger.chain import Ledger, canonical, read_entries, verify_ledger
from atoll.ledger.signing import Signer, verify


def make_ledger(path, n=5, signer=None):
    signer = signer or Signer.generate()
    led = Ledger(path, signer)
    led.append("genesis", 0, {"coordinator_key": signer.public, "run_id": "r"})
    for i in range(1, n):
        led.append("round", i, {"round": i, "sites": {"a": {"tokens": 100 * i, "value": 0.5}}})
    led.close()
    return signer


def tamper(path, *sql):
    db = sqlite3.connect(path)
    db.executescript("DROP TRIGGER entries_no_update; DROP TRIGGER entries_no_delete;")
    for s in sql:
        db.execute(s)
    db.commit()
    db.close()


def test_intact_chain_verifies_and_reopening_continues_it(tmp_path):
    path = tmp_path / "ledger.sqlite"
    signer = make_ledger(path)
    led = Ledger(path, signer)
    led.append("round", 5, {"round": 5})
    led.close()
    verdict = verify_ledger(path, public=signer.public)
    assert verdict.ok and verdict.entries == 6, verdict
    assert [e.seq for e in read_entries(path)] == [1, 2, 3, 4, 5, 6]


def test_sqlite_refuses_updates_and_deletes(tmp_path):
    path = tmp_path / "ledger.sqlite"
    make_ledger(path)
    db = sqlite3.connect(path)
    for sql in ("UPDATE entries SET round = 9 WHERE seq = 2", "DELETE FROM entries"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute(sql)
    db.close()


@pytest.mark.parametrize("sql, bad, reason", [
    # a credited number changed
    (["UPDATE entries SET body = replace(body, '\"tokens\":200', '\"tokens\":900') "
      "WHERE seq = 3"], 3, "does not match its hash"),
    # a row removed from the middle
    (["DELETE FROM entries WHERE seq = 3"], 4, "out of place"),
    # the last row removed (the signed head still names it)
    (["DELETE FROM entries WHERE seq = 5"], 5, "cut off the end"),
    # two rows swapped
    (["UPDATE entries SET seq = -1 WHERE seq = 2", "UPDATE entries SET seq = 2 WHERE seq = 3",
      "UPDATE entries SET seq = 3 WHERE seq = -1"], 2, "does not link"),
    # a row edited and its hash recomputed: the signature gives it away
    (["UPDATE entries SET kind = 'void' WHERE seq = 4"], 4, "does not match its hash"),
])
def test_tampering_is_found_and_named(tmp_path, sql, bad, reason):
    path = tmp_path / "ledger.sqlite"
    make_ledger(path)
    assert verify_ledger(path).ok
    tamper(path, *sql)
    verdict = verify_ledger(path)
    assert not verdict.ok and verdict.bad_seq == bad, verdict
    assert reason in verdict.reason, verdict


def test_rehashed_edit_fails_the_signature_and_a_forged_chain_fails_the_key(tmp_path):
    from atoll.ledger.chain import entry_hash

    path = tmp_path / "ledger.sqlite"
    signer = make_ledger(path)
    e = read_entries(path)[2]
    body = canonical({**e.body, "round": 99})
    h = entry_hash(e.seq, e.kind, e.round, e.prev, body)
    tamper(path, f"UPDATE entries SET body = '{body}', hash = '{h}' WHERE seq = 3")
    verdict = verify_ledger(path)
    assert verdict.bad_seq == 3 and verdict.reason == "bad signature"

    forged = tmp_path / "forged.sqlite"
    make_ledger(forged)  # a whole new chain under someone else's key
    assert verify_ledger(forged).ok
    verdict = verify_ledger(forged, public=signer.public)
    assert verdict.bad_seq == 1 and "different coordinator key" in verdict.reason


def test_signatures():
    s = Signer.generate()
    sig = s.sign(b"report")
    assert verify(s.public, b"report", sig)
    assert not verify(s.public, b"report!", sig)
    assert not verify(Signer.generate().public, b"report", sig)
    assert not verify(s.public, b"report", "zz")
