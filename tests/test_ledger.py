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


def test_a_run_keeps_its_ledger_key_elsewhere_and_will_not_extend_a_rewritten_ledger(
        demo_data, tmp_path):
    """The private key that signs a run's ledger is not in the run folder; a resume first
    verifies the ledger against it and refuses to append to an edited history."""
    from atoll.app.books import LedgerError, ledger_key_path
    from atoll.app.simulate import simulate
    from atoll.cli import main
    from tests.conftest import small_config

    cfg = small_config({"code": demo_data["code"]}, federation={"rounds": 2})
    run = simulate(cfg, tmp_path / "run", report=False)
    out = run.out
    assert not (out / "ledger.key").exists() and (out / "ledger.key.pub").exists()
    key = ledger_key_path(out, run.run_id)
    assert key.exists() and oct(key.stat().st_mode & 0o777) == "0o600"
    assert Signer.load_or_create(key).public == (out / "ledger.key.pub").read_text().strip()
    cfg.federation.rounds = 3
    tamper(out / "ledger.sqlite", "UPDATE entries SET body = replace(body, '\"tokens\":', "
                                  "'\"tokens\":1') WHERE kind = 'update'")
    entries = len(read_entries(out / "ledger.sqlite"))
    with pytest.raises(LedgerError, match="refusing to append"):
        simulate(cfg, out, resume=True, report=False)
    assert main(["simulate", "--resume", str(out)]) != 0  # one line, not a traceback
    assert len(read_entries(out / "ledger.sqlite")) == entries  # nothing was added


def test_sites_hold_signed_heads_that_show_a_cut_or_rewritten_history(demo_data, tmp_path):
    """An operator with the ledger key can cut the ledger or rewrite an entry and re-sign a
    consistent chain: `atoll ledger verify` alone then says ok. The heads the sites were sent
    with every plan say otherwise."""
    from atoll.app.books import ledger_key_path
    from atoll.app.simulate import simulate
    from atoll.cli import main
    from atoll.ledger.heads import HEADS, read_heads
    from tests.conftest import small_config

    cfg = small_config({s: demo_data[s] for s in ("code", "speeches")})
    run = simulate(cfg, tmp_path / "run", report=False)
    out, ledger = run.out, run.out / "ledger.sqlite"
    sites = [str(out / "sites" / s) for s in ("code", "speeches")]
    heads = read_heads(out / "sites" / "code" / HEADS)
    assert [h["round"] for h in heads] == [1, 2, 3]  # one new head per round's plan
    entries = read_entries(ledger)
    assert heads[-1]["seq"] == max(e.seq for e in entries if e.round <= 2)
    assert main(["ledger", "verify", str(out), *sum((["--site-state", d] for d in sites),
                                                    [])]) == 0
    signer = Signer.load_or_create(ledger_key_path(out, run.run_id))
    keep = [e for e in entries if e.round < 2]  # cut rounds 2 and 3
    tamper(ledger, f"DELETE FROM entries WHERE seq > {keep[-1].seq}")
    Ledger(ledger, signer)._write_head(keep[-1].seq, keep[-1].hash)  # re-signed by its key
    assert verify_ledger(ledger).ok  # the ledger alone cannot tell
    assert main(["ledger", "verify", str(out), "--site-state", sites[0]]) == 1
    # now the cut entries come back, but one of round 2 says something else
    book = Ledger(ledger, signer)
    for e in entries[len(keep):]:
        body = dict(e.body, tokens=1) if e.kind == "round" and e.round == 2 else e.body
        book.append(e.kind, e.round, body)
    assert verify_ledger(ledger).ok
    from atoll.ledger.heads import check_heads

    problems = check_heads(ledger, out / "sites" / "code", run.run_id, signer.public)
    assert problems and all("rewritten" in p for p in problems), problems


def test_a_site_keeps_each_head_once_and_survives_a_torn_line(tmp_path):
    from atoll.ledger.heads import HEADS, read_heads, remember_head

    head = {"seq": 3, "hash": "ab", "signature": "cd"}
    remember_head(tmp_path, "run", 2, head)
    remember_head(tmp_path, "run", 3, head)  # the same head again: not kept twice
    assert [h["round"] for h in read_heads(tmp_path / HEADS)] == [2]
    with open(tmp_path / HEADS, "a") as f:
        f.write('{"run_id": "run", "seq"')  # a crash mid-line
    remember_head(tmp_path, "run", 3, head)  # the last whole line is still this head
    remember_head(tmp_path, "run", 4, {**head, "seq": 4, "hash": "ef"})
    assert [h["seq"] for h in read_heads(tmp_path / HEADS)] == [3, 4]
