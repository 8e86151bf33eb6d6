"""Federated evaluation: the sites measure the global weights on their own held-out rows.

The reference is the coordinator measuring the same weights on the same rows itself (a
simulation can read the sites' data): the figures must be the same. A site that lies in its
report is refused with a reason and the run goes on; consent applies to held-out rows."""

from __future__ import annotations

import numpy as np
import pytest

from atoll.app.metrics import read_metrics
from atoll.app.run import Run
from atoll.app.simulate import simulate
from atoll.consent.pool import Pool
from atoll.data.reader import TokenDataset
from atoll.federation.evaluation import (
    EvalReport,
    check_against_request,
    checked_report,
    eval_requests,
    merge_reports,
)
from atoll.federation.protocol import header
from atoll.federation.site import Site
from atoll.util.errors import WireError
from tests.conftest import small_config
from tests.test_consent import SiteEngine
from tests.test_consent import pool as pool  # noqa: F401 - a fixture


def val_records(out):
    return {r["round"]: r for r in read_metrics(out / "metrics.jsonl")
            if r["kind"] == "round" and r["run"] == "federation" and r.get("val_loss")}


def test_sites_report_what_the_coordinator_measures(demo_data, tmp_path):
    """Same run, evaluated by the sites and by the coordinator: the same loss per domain
    after every round (0, 2 and 3), and the sites say how many tokens they measured."""
    data = {s: demo_data[s] for s in ("code", "speeches")}
    runs = {}
    for at in ("sites", "coordinator"):
        cfg = small_config(data, eval={"at": at, "every": 2})
        runs[at] = val_records(simulate(cfg, tmp_path / at, report=False).out)
    assert sorted(runs["sites"]) == sorted(runs["coordinator"]) == [0, 2, 3]
    for r, rec in runs["sites"].items():
        ref = runs["coordinator"][r]["val_loss"]
        assert sorted(rec["val_loss"]) == ["code", "speeches"]
        for domain, loss in rec["val_loss"].items():
            assert loss == pytest.approx(ref[domain], rel=1e-6, abs=1e-6)
        # 2 batches of 8 rows of 64 tokens, 63 predicted each
        assert rec["val_tokens"] == {"code": 2 * 8 * 63, "speeches": 2 * 8 * 63}
        assert rec["eval_refused"] == {}
        assert rec["eval_bytes"] > 2 * 4 * sum(1 for _ in rec["val_loss"])  # weights went down


@pytest.mark.parametrize("fault", ["eval_nan", "eval_huge_tokens", "eval_wrong_round"])
def test_a_lying_report_is_refused_and_the_run_goes_on(demo_data, tmp_path, fault):
    data = {s: demo_data[s] for s in ("code", "speeches")}
    cfg = small_config(data, eval={"every": 3})
    cfg.sites[1].fault = fault
    run = simulate(cfg, tmp_path / "run", report=False)
    recs = val_records(run.out)
    assert sorted(recs) == [0, 3]
    for rec in recs.values():
        assert list(rec["val_loss"]) == ["code"]  # the liar's figure is not counted
        assert list(rec["eval_refused"]) == ["speeches"]
    assert run.coordinator.round == 3
    # its training was honest: every round counted it
    sites = [r for r in read_metrics(run.out / "metrics.jsonl") if r["kind"] == "site"]
    assert all(r["accepted"] for r in sites)


def test_report_checks():
    req = eval_requests("run", 4, ["a"], {}, {}, seq_len=65, purpose="p", batch_size=2,
                        max_batches=3)["a"]
    good = EvalReport("run", 4, "a", loss=2.5, tokens=6 * 64, seconds=0.1)
    assert check_against_request(good, req) is None
    assert checked_report(header(good), sender="a") == good
    for change, words in [({"tokens": 7 * 64}, "at most 384"), ({"tokens": 100}, "whole rows"),
                          ({"tokens": 0}, "0 tokens"), ({"round": 3}, "round 4"),
                          ({"loss": 1e6}, "above")]:
        bad = EvalReport(**{**good.__dict__, **change})
        assert words in check_against_request(bad, req)
    for change, words in [({"loss": "2.5"}, "'loss'"), ({"tokens": True}, "'tokens'"),
                          ({"site": "b"}, "sent by the node of site 'a'"),
                          ({"extra": 1}, "fields"), ({"loss": -1.0}, "'loss'")]:
        with pytest.raises(WireError, match=words):
            checked_report({**header(good), **change}, sender="a")
    a = EvalReport("run", 1, "x", 2.0, 100, 0.0)
    b = EvalReport("run", 1, "x", 4.0, 300, 0.0)
    losses, tokens = merge_reports([a, b])
    assert losses == {"x": pytest.approx(3.5)} and tokens == {"x": 400}


def test_consent_applies_to_held_out_rows(tmp_path, pool):
    """Carol revokes during round 2: from the evaluation after it on, the site no longer
    reads her held-out rows (fewer tokens); research-only alice's are never read."""
    def revoke(r):
        if r == 2:
            p = Pool(pool)
            assert p.revoke("carol")
            p.close()

    cfg = small_config({"pool": pool}, purpose="commercial", eval={"max_batches": 0},
                       federation={"rounds": 4, "steps_per_round": 2})
    run = Run(cfg, tmp_path / "run")
    engine = SiteEngine([Site("pool", pool, tmp_path / "run" / "sites" / "pool")], revoke)
    run.execute(engine)
    run.close()
    tokens = {r: rec["val_tokens"]["pool"] for r, rec in val_records(run.out).items()}
    ds = TokenDataset(pool, "val", 64)
    rows = {s["contributor"]: int((np.asarray(ds.row_sources) == s["id"]).sum())
            for s in ds.sources}
    assert rows["alice"] and rows["bob"] and rows["carol"]
    assert tokens[0] == tokens[1] == (rows["bob"] + rows["carol"]) * 63, (tokens, rows)
    assert tokens[2] == tokens[3] == tokens[4] == rows["bob"] * 63, (tokens, rows)
