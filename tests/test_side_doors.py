"""Privacy and consent have no side doors: the pool keeps every record under concurrent
writers, names no contributor's file, and differential privacy cannot be weakened quietly."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch

import atoll.consent.pool as pool_module
from atoll.app.metrics import read_metrics
from atoll.app.run import Run
from atoll.app.run_config import RunConfig
from atoll.app.simulate import simulate
from atoll.config import from_dict
from atoll.consent.pool import Pool
from atoll.data.reader import TokenDataset
from atoll.federation.privacy import PrivacyConfig, epsilon
from atoll.federation.site import Site
from atoll.ledger.chain import read_entries, verify_ledger
from tests.conftest import small_config
from tests.test_consent import SiteEngine, sources_of, text_file
from tests.test_consent import pool as pool  # noqa: F401 - a fixture
from tests.test_federation import coordinator, update


def quiet(_: str) -> None:
    pass


def test_two_writers_on_one_pool_lose_no_contribution(tmp_path, monkeypatch):
    """Writer A pauses between reading the manifest and writing it back; writer B starts
    then. Without the pool's lock B rewrites the manifest from the same old copy and one
    of the two contributions vanishes from it; with the lock B waits for A."""
    Pool.open_or_create(tmp_path / "pool", seq_len=64).close()
    files = {w: text_file(tmp_path / f"{w}.txt", i) for i, w in enumerate("AB")}
    a_paused, b_started = threading.Event(), threading.Event()
    real_write = pool_module.write_atomic

    def write_atomic(path, data):
        if threading.current_thread().name == "A" and path.name == "manifest.json":
            a_paused.set()
            b_started.wait(timeout=5)  # with the lock B cannot start: A goes on alone
        real_write(path, data)

    real_add = Pool._add_to_manifest

    def add_to_manifest(self, cid, sub):
        if threading.current_thread().name == "B":
            b_started.set()
        return real_add(self, cid, sub)

    monkeypatch.setattr(pool_module, "write_atomic", write_atomic)
    monkeypatch.setattr(Pool, "_add_to_manifest", add_to_manifest)

    def contribute(who):
        p = Pool(tmp_path / "pool")
        p.contribute(who.lower(), files[who], ["research"], log=quiet)
        p.close()

    a = threading.Thread(target=contribute, args=("A",), name="A")
    a.start()
    assert a_paused.wait(timeout=60)
    b = threading.Thread(target=contribute, args=("B",), name="B")
    b.start()
    a.join()
    b.join()
    p = Pool(tmp_path / "pool")
    manifest = json.loads((tmp_path / "pool" / "manifest.json").read_text())
    assert sorted(s["contribution"] for s in manifest["sources"]) == \
        sorted(c.id for c in p.contributions())
    assert len(manifest["sources"]) == 2
    assert {sh["source"] for sh in manifest["splits"]["train"]["shards"]} == {0, 1}


def test_no_manifest_in_a_pool_names_a_contributors_file(tmp_path):
    home = tmp_path / "alice-private-notes"
    home.mkdir()
    p = Pool.open_or_create(tmp_path / "pool", seq_len=64)
    p.contribute("alice", text_file(home / "diary-2026.txt", 1), ["research"], log=quiet)
    p.close()
    manifests = list((tmp_path / "pool").rglob("manifest.json"))
    assert len(manifests) == 2  # the pool's, and the contribution's own
    for m in manifests:
        text = m.read_text()
        assert "alice-private-notes" not in text and "diary-2026" not in text, m
        for source in json.loads(text)["sources"]:
            assert "path" not in source


def test_the_noise_seed_is_refused_outside_the_tests(monkeypatch):
    monkeypatch.delenv("ATOLL_TEST_NOISE_SEED")
    with pytest.raises(ValueError, match="privacy.seed is for atoll's own tests"):
        from_dict(RunConfig, {"privacy": {"noise_multiplier": 1.0, "seed": 7}})
    from_dict(RunConfig, {"privacy": {"noise_multiplier": 1.0}})  # the OS's noise: fine


def test_late_updates_do_not_enter_a_private_round():
    """Refused in the config, and by the coordinator however it was configured: a late
    update would be a second contribution of one site in a round counted once."""
    with pytest.raises(ValueError, match="max_staleness"):
        from_dict(RunConfig, {"privacy": {"noise_multiplier": 1.0},
                              "federation": {"max_staleness": 1}})
    c = coordinator()
    c.cfg.federation.max_staleness = 1
    c.cfg.privacy = PrivacyConfig(noise_multiplier=1.0, clip=1.0)
    c.budget.cfg = c.cfg.privacy
    c.open_round(["a", "b"])
    assert c.accept(update("a", round_=1)) is None
    c.reject("b", "no reply within the deadline")
    c.close()
    c.open_round(["a"])
    assert c.accept(update("b", round_=1)) is not None  # one round late: not counted
    assert c.accept(update("a", round_=2)) is None
    out = c.close()
    assert out.late == [] and out.accepted == ["a"]


def privacy_of(out):
    records = read_metrics(out / "metrics.jsonl")
    eps = {r["round"]: r["epsilon"] for r in records
           if r["kind"] == "round" and r["run"] == "federation" and r["round"] > 0}
    return eps, [r for r in records if r["kind"] == "privacy"]


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_a_resume_that_changes_dp_says_so(demo_data, tmp_path, sigma):
    """Two private rounds at sigma 1, then a resume at ``sigma``: the change is in the
    ledger, the metrics and the report; switched off, the budget becomes unbounded, never
    quietly frozen; weaker, it grows faster than it would have."""
    data = {s: demo_data[s] for s in ("code", "speeches")}
    before = {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}
    simulate(small_config(data, privacy=before, federation={"rounds": 2}), tmp_path / "run",
             report=False)
    after = dict(before, noise_multiplier=sigma)
    simulate(small_config(data, privacy=after, federation={"rounds": 4}), tmp_path / "run",
             resume=True, report=True)
    eps, changes = privacy_of(tmp_path / "run")
    assert [(c["round"], c["from"], c["to"]) for c in changes] == [(2, before, after)]
    (entry,) = [e for e in read_entries(tmp_path / "run" / "ledger.sqlite")
                if e.kind == "privacy"]
    assert entry.round == 2 and entry.body == {"from": before, "to": after}
    assert verify_ledger(tmp_path / "run" / "ledger.sqlite").ok
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Privacy settings changed when the run resumed after round 2" in page
    assert math.isfinite(eps[2]) and eps[4] >= eps[3] > eps[2]
    if sigma == 0.0:
        assert eps[3] == eps[4] == math.inf and "epsilon unbounded" in page
    else:
        steady = epsilon([(1.0, 1.0, 4)], 1e-5)
        assert math.isfinite(eps[4]) and eps[4] > steady


def test_the_coordinators_own_reads_follow_consent(tmp_path, pool):
    """Carol revokes during round 2. From the round after it, the coordinator's own
    held-out set, the credit probe and the data-parallel baseline (all reading the pool)
    no longer read her rows."""
    carol = sources_of(pool)["carol"]
    rows = {}

    def watch(r):
        sets = run.eval_sets["pool"]  # as read after round r - 1
        rows[r] = (sum(b.shape[0] for b in sets), run.baselines[0].readers[0].yielded.get(
            carol, 0), torch.cat(run.books.probe.read_batches()))
        if r == 2:
            p = Pool(pool)
            assert p.revoke("carol")
            p.close()

    cfg = small_config({"pool": pool}, purpose="commercial",
                       eval={"at": "coordinator", "max_batches": 0,
                             "sets": [{"name": "pool", "data": str(pool)}]},
                       baseline={"kinds": ["data_parallel"]}, credit={"batches": 1000},
                       federation={"rounds": 4, "steps_per_round": 2})
    run = Run(cfg, tmp_path / "run")
    engine = SiteEngine([Site("pool", pool, tmp_path / "run" / "sites" / "pool")], watch)
    run.execute(engine)
    run.close()
    ds = TokenDataset(pool, "val", 64)
    per = {s["contributor"]: int((np.asarray(ds.row_sources) == s["id"]).sum())
           for s in ds.sources}
    assert rows[1][0] == rows[2][0] == per["bob"] + per["carol"]
    assert rows[3][0] == rows[4][0] == per["bob"]
    assert rows[2][1] > 0 and rows[4][1] == rows[3][1] == rows[2][1]  # the baseline
    assert rows[2][2].shape[0] == rows[2][0] and rows[3][2].shape[0] == rows[3][0]  # probe
