"""Consent at the point of use: purposes, expiry and revocation enforced by the reader;
duplicates counted once; every update signed, valued and chained into the ledger."""

from __future__ import annotations

import itertools
import json
import random
import sqlite3

import numpy as np
import pytest

from atoll.app.run import Run
from atoll.cli import main
from atoll.consent.pool import Pool
from atoll.data.demo import speeches
from atoll.data.reader import TokenDataset
from atoll.engines.local import LocalEngine
from atoll.federation.site import Site
from atoll.ledger.chain import read_entries, verify_ledger
from atoll.ledger.credit import shares
from tests.conftest import small_config


def text_file(path, seed, words=6000):
    """A file of real-looking prose (shuffled words of the first State of the Union
    addresses, which no edit of ours changes), different per seed."""
    vocab = " ".join(itertools.islice(speeches(), 5)).split()
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(vocab) for _ in range(words)))
    return path


@pytest.fixture
def pool(tmp_path):
    """alice: research only; bob: commercial and pretraining; carol: commercial."""
    p = Pool.open_or_create(tmp_path / "pool", seq_len=64)
    p.contribute("alice", text_file(tmp_path / "a.txt", 1), ["research"], log=lambda s: None)
    p.contribute("bob", text_file(tmp_path / "b.txt", 2), ["commercial", "pretraining"],
                 log=lambda s: None)
    p.contribute("carol", text_file(tmp_path / "c.txt", 3), ["commercial"], log=lambda s: None)
    p.close()
    return tmp_path / "pool"


def sources_of(pool_dir):
    ds = TokenDataset(pool_dir, "train")
    return {s["contributor"]: s["id"] for s in ds.sources}


class SiteEngine(LocalEngine):
    """The local engine, with a hook after every round (a contributor acting meanwhile)."""

    def __init__(self, sites, after_round=None):
        super().__init__(sites)
        self.after_round = after_round
        self.yielded_after = {}

    def exchange(self, plans, deadline_s=0.0):
        yield from super().exchange(plans, deadline_s)
        r = next(iter(plans.values())).round
        self.yielded_after[r] = {s.name: dict(s.reader.yielded) for s in self.sites.values()}
        if self.after_round:
            self.after_round(r)


def run_pool(tmp_path, pool_dir, purpose, rounds=3, after_round=None, name="run"):
    cfg = small_config({"pool": pool_dir}, purpose=purpose,
                       federation={"rounds": rounds, "steps_per_round": 4})
    run = Run(cfg, tmp_path / name)
    sites = [Site("pool", pool_dir, tmp_path / name / "sites" / "pool")]
    engine = SiteEngine(sites, after_round)
    run.execute(engine)
    run.close()
    return run, engine


def test_a_commercial_run_never_reads_research_only_data(tmp_path, pool):
    src = sources_of(pool)
    _, engine = run_pool(tmp_path, pool, "commercial")
    read = engine.yielded_after[3]["pool"]  # the reader's own account, rows per source
    assert read.get(src["alice"], 0) == 0
    assert read[src["bob"]] > 0 and read[src["carol"]] > 0
    # and what the site signed says the same
    for e in read_entries(tmp_path / "run" / "ledger.sqlite"):
        if e.kind == "update":
            who = {c["contributor"] for c in e.body["receipt"]["contributions"].values()}
            assert who <= {"bob", "carol"}, e.body
    # a research run reads alice only
    _, engine = run_pool(tmp_path, pool, "research", rounds=1, name="research")
    assert set(engine.yielded_after[1]["pool"]) == {src["alice"]}


def test_revocation_takes_effect_from_the_next_round_and_erases(tmp_path, pool):
    src = sources_of(pool)

    def revoke(r):
        if r == 2:
            p = Pool(pool)
            assert p.revoke("carol")
            p.close()

    _, engine = run_pool(tmp_path, pool, "commercial", rounds=4, after_round=revoke)
    carol = [engine.yielded_after[r]["pool"].get(src["carol"], 0) for r in (1, 2, 3, 4)]
    assert carol[0] > 0 and carol[1] > carol[0]  # read in rounds 1 and 2
    assert carol[3] == carol[2] == carol[1]  # not one row after round 2
    rounds_read = {e.round for e in read_entries(tmp_path / "run" / "ledger.sqlite")
                   if e.kind == "update" and any(c["contributor"] == "carol" for c in
                                                 e.body["receipt"]["contributions"].values())}
    assert rounds_read == {1, 2}
    ds = TokenDataset(pool, "train")  # her rows were overwritten at the site
    rows = np.flatnonzero(np.asarray(ds.row_sources) == src["carol"])
    assert rows.size and not ds.rows(rows).any()
    assert Pool(pool).contributions()[2].erased_at is not None


def test_expired_consent_is_not_read(tmp_path):
    p = Pool.open_or_create(tmp_path / "pool", seq_len=64)
    p.contribute("old", text_file(tmp_path / "o.txt", 4), ["pretraining"], expires="2020-01-01",
                 log=lambda s: None)
    p.contribute("new", text_file(tmp_path / "n.txt", 5), ["pretraining"], log=lambda s: None)
    p.close()
    src = sources_of(tmp_path / "pool")
    _, engine = run_pool(tmp_path, tmp_path / "pool", "pretraining", rounds=1)
    assert set(engine.yielded_after[1]["pool"]) == {src["new"]}


def test_nothing_allowed_is_one_clear_refusal(tmp_path, pool):
    run, _ = run_pool(tmp_path, pool, "advertising", rounds=1)
    rounds = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    reason = rounds[-1]["rejected"]["pool"]
    assert "no contribution" in reason and "'advertising'" in reason


def test_duplicates_are_credited_once(tmp_path):
    p = Pool.open_or_create(tmp_path / "pool", seq_len=64)
    a = text_file(tmp_path / "a.txt", 1)
    first = p.contribute("alice", a, ["pretraining"], log=lambda s: None)
    again = p.contribute("mallory", a, ["pretraining"], log=lambda s: None)  # exact copy
    near = tmp_path / "near.txt"
    # a tenth rewritten: clearly near (Jaccard ~0.9), and never all 128 MinHash values equal
    # (0.9^128), whatever words the README lends text_file
    text = a.read_text()
    near.write_text(text[: len(text) * 9 // 10] + " plus a few words of my own")
    nearly = p.contribute("mallory", near, ["pretraining"], log=lambda s: None)
    other = p.contribute("bob", text_file(tmp_path / "b.txt", 2), ["pretraining"],
                         log=lambda s: None)
    p.close()
    assert again.duplicate_of == first.id and again.source is None
    assert nearly.duplicate_of == first.id and 0.8 <= nearly.similarity < 1.0
    assert other.duplicate_of is None
    assert len(TokenDataset(tmp_path / "pool").sources) == 2  # rows exist once
    run_pool(tmp_path, tmp_path / "pool", "pretraining", rounds=2)
    table = shares(read_entries(tmp_path / "run" / "ledger.sqlite"))
    assert {s.contributor for s in table} == {"alice", "bob"}
    assert sum(s.share for s in table) == pytest.approx(1.0)
    assert all(s.share > 0 for s in table)


def test_cli_contribute_revoke_verify_shares(tmp_path, capsys, pool):
    assert main(["contribute", "--site", str(pool), "--contributor", "dan", "--file",
                 str(text_file(tmp_path / "d.txt", 9)), "--allow", "commercial"]) == 0
    assert main(["contribute", "--site", str(pool), "--contributor", "eve", "--file",
                 str(tmp_path / "d.txt"), "--allow", "commercial"]) == 0
    assert "duplicate of" in capsys.readouterr().out
    assert main(["contribute", "--site", str(pool), "--contributor", "x", "--file",
                 str(tmp_path / "nope.txt"), "--allow", "research"]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert main(["consent", "revoke", "--site", str(pool), "--contributor", "dan"]) == 0
    assert "revoked 1 contribution(s) of dan" in capsys.readouterr().out
    run_pool(tmp_path, pool, "commercial", rounds=2)
    out = tmp_path / "run"
    assert main(["ledger", "verify", str(out), "--key", str(out / "ledger.key.pub")]) == 0
    assert main(["shares", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bob" in printed and "carol" in printed and "dan" not in printed
    db = sqlite3.connect(out / "ledger.sqlite")
    db.executescript("DROP TRIGGER entries_no_update;")
    db.execute("UPDATE entries SET body = replace(body, '\"site\":\"pool\"', "
               "'\"site\":\"elsewhere\"') WHERE seq = 2")
    db.commit()
    db.close()
    assert main(["ledger", "verify", str(out)]) == 1
    assert "ledger entry 2: its content does not match its hash" in capsys.readouterr().err
    assert main(["shares", str(out)]) == 1


def test_the_ledger_chains_every_round_with_signed_reports(demo_data, tmp_path):
    from atoll.app.simulate import simulate

    cfg = small_config(demo_data, ["code", "speeches"], federation={"rounds": 3})
    simulate(cfg, tmp_path / "run", report=False)
    path = tmp_path / "run" / "ledger.sqlite"
    assert verify_ledger(path).ok
    entries = read_entries(path)
    assert [e.kind for e in entries] == ["genesis"] + ["update", "update", "round"] * 3
    for e in entries:
        if e.kind == "update":
            assert e.body["receipt"]["tokens"] == e.body["tokens"] == 3 * 4 * 64
            assert e.body["weight"] == pytest.approx(0.5)
            assert e.body["value"] == pytest.approx(0.5 * e.body["alignment"])
    # ids and hashes only: no 24-byte piece of what was trained on is in the ledger
    ledger = path.read_bytes()
    for site in ("code", "speeches"):
        rows = TokenDataset(demo_data[site], "train").rows(np.arange(0, 400, 10))
        pieces = [bytes(r[i : i + 24].astype(np.uint8)) for r in rows for i in (0, 30)]
        assert not [p for p in pieces if p in ledger]


def test_a_restart_voids_the_rounds_it_repeats_and_shares_match(demo_data, tmp_path):
    """Checkpoint every 2 rounds, crash in round 4: round 3 was written to the ledger but is
    run again; the ledger says so (a void entry) and the shares equal the straight run's."""
    from atoll.app.simulate import simulate
    from tests.test_resume import crash_in_round

    cfg = small_config(demo_data, ["code", "speeches"], federation={"rounds": 4},
                       checkpoint={"every": 2})
    simulate(cfg, tmp_path / "straight", report=False)
    out = tmp_path / "crashed"
    crash_in_round(cfg, out, at=4)
    simulate(cfg, out, resume=True, report=False)
    assert verify_ledger(out / "ledger.sqlite").ok
    voids = [e for e in read_entries(out / "ledger.sqlite") if e.kind == "void"]
    assert len(voids) == 1 and voids[0].body["rounds"] == [3]
    a = shares(read_entries(tmp_path / "straight" / "ledger.sqlite"))
    b = shares(read_entries(out / "ledger.sqlite"))
    assert [(s.contributor, s.tokens) for s in a] == [(s.contributor, s.tokens) for s in b]
    for x, y in zip(a, b, strict=True):
        assert x.share == pytest.approx(y.share, abs=1e-9)


def test_a_garbage_site_earns_clearly_less(demo_data, tmp_path):
    """The four demo domains plus a site whose tokens are shuffled bytes of the same text
    (right letter frequencies, no language). Measured here (6 rounds of 10 steps): in round
    1 every update, garbage too, teaches letter frequencies (values 2.17-2.98, garbage
    2.21); from round 2 on the honest sites' values sum to +0.036 (scripture) .. +0.152
    (code) and the garbage site's to -0.056: it pulls the model away from language. Shares:
    garbage 3.5%, honest sites 12.7% (scripture) .. 37.2% (code)."""
    from atoll.app.simulate import simulate
    from atoll.data.prepare import PrepareOptions, prepare

    raw = bytearray(b"".join(bytes(r.astype(np.uint8)) for r in TokenDataset(
        demo_data["speeches"], "train").rows(np.arange(1500))))
    random.Random(0).shuffle(raw)
    garbage_file = tmp_path / "garbage.txt"
    garbage_file.write_bytes(bytes(b if 32 <= b < 127 else 32 for b in raw))
    prepare([garbage_file], tmp_path / "garbage", PrepareOptions(seq_len=64), log=lambda s: 0)
    honest = ["code", "scripture", "shakespeare", "speeches"]
    data = {**{s: demo_data[s] for s in honest}, "garbage": tmp_path / "garbage"}
    cfg = small_config(data, federation={"rounds": 6, "steps_per_round": 10},
                       outer={"lr": 1.0, "momentum": 0.0, "nesterov": False},
                       eval={"sets": [{"name": s, "data": str(demo_data[s])} for s in honest]})
    simulate(cfg, tmp_path / "run", report=False)
    entries = read_entries(tmp_path / "run" / "ledger.sqlite")
    later = {s: 0.0 for s in data}  # summed values after the first round
    for e in entries:
        if e.kind == "update" and e.round > 1:
            later[e.body["site"]] += e.body["value"]
    table = {s.sites[0]: s.share for s in shares(entries)}
    assert later["garbage"] < 0 < min(later[s] for s in honest), later
    assert all(table[s] > 3 * table["garbage"] for s in honest), table
    assert sum(table.values()) == pytest.approx(1.0)
