"""A grid of paths in the round loop (issue 16): what each site is sent and trains, what each
module's outer step is made of, the 1 x 1 grid against the dense run, resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from atoll.app.metrics import read_metrics
from atoll.app.run import Run
from atoll.app.simulate import simulate
from atoll.cli.main import main
from atoll.config import ConfigError
from atoll.engines.local import LocalEngine
from atoll.federation.codecs import decode, parse_spec
from atoll.federation.features import (
    FeatureReport,
    check_against_request,
    feature_requests,
)
from atoll.federation.site import Site
from atoll.ledger.chain import read_entries, verify_ledger
from atoll.ledger.credit import shares
from atoll.paths.grid import PathsConfig, parse_path, path_weights
from atoll.paths.router_config import RouterConfig
from tests.conftest import small_config
from tests.test_resume import Crash, CrashingEngine, comparable

GRID = {"levels": [[0, 2], [2, 4]], "modules_per_level": [2, 2]}
ONE = {"levels": [[0, 4]], "modules_per_level": [1]}
# the embeddings and the head as levels of their own, two modules each
OWN_ENDS = {"levels": ["embed", [0, 4], "head"], "modules_per_level": [2, 1, 2]}
SITES = ["code", "scripture", "shakespeare", "speeches"]


def grid_config(demo_data, paths, sites=SITES, **sections):
    cfg = small_config(demo_data, sites, model={"paths": paths}, eval={"at": "coordinator"},
                       **sections)
    cfg.check()
    return cfg


class RecordingEngine(LocalEngine):
    """The local engine, keeping every round's plans and a copy of the global weights as
    the round opened, so that a test can look at what each site was sent."""

    def __init__(self, sites, run: Run) -> None:
        super().__init__(sites)
        self.run = run
        self.sent: list[tuple[dict, dict]] = []  # (plans, weights at the round's open)

    def exchange(self, plans, deadline_s=0.0):
        weights = {k: v.clone() for k, v in self.run.coordinator.weights.items()}
        # as they went out (an fp32 payload shares the global tensors the outer step moves)
        sent = {s: (p.path, p.codec, {k: v.clone() for k, v in p.weights.items()})
                for s, p in plans.items()}
        self.sent.append((sent, weights))
        yield from super().exchange(plans, deadline_s)


def run_recorded(cfg, out):
    """The run, its engine, and the weights before and after each round."""
    run = Run(cfg, out)
    engine = RecordingEngine([Site(s.name, s.data, out / "sites" / s.name) for s in cfg.sites],
                             run)
    run.execute(engine)
    run.finish()
    run.close()
    weights = [w for _, w in engine.sent] + [dict(run.coordinator.weights)]
    return run, engine, weights


@pytest.mark.parametrize("grid", [GRID, OWN_ENDS], ids=["blocks", "own-ends"])
def test_a_site_is_sent_only_its_paths_modules_and_untrained_modules_stay(demo_data, tmp_path,
                                                                         grid):
    cfg = grid_config(demo_data, grid)
    run, engine, weights = run_recorded(cfg, tmp_path / "grid")
    paths = PathsConfig(**grid)
    one_path = sum(t.numel() for t in run.model.parameters())
    grid_size = sum(t.numel() for t in run.coordinator.weights.values())
    assert grid_size > one_path + 30_000  # a second embedding and head at least
    drawn = set()
    for r, (plans, opened) in enumerate(engine.sent, start=1):
        touched = set()
        for site, (name, codec, sent) in plans.items():
            path = parse_path(name, paths)
            drawn.add(path)
            want = path_weights(opened, path, paths)
            got = decode(sent, {n: t.shape for n, t in want.items()}, parse_spec(codec))
            assert got.keys() == want.keys()  # exactly one path's tensors, nothing more
            assert all(torch.equal(got[n], want[n]) for n in want), (r, site)
            assert sum(t.numel() for t in sent.values()) == one_path
            touched |= set(paths.modules_of(path))
        # a module no site trained this round did not move; every other one did
        for key, w in weights[r].items():
            still = torch.equal(w, weights[r - 1][key])
            assert still == (key.partition("/")[0] not in touched), (r, key)
    assert len(drawn) > 1  # the four domains do not all route to one path
    sites = [m for m in read_metrics(tmp_path / "grid" / "metrics.jsonl") if m["kind"] == "site"]
    assert all(m["accepted"] for m in sites)
    # bytes down per site: one path's fp32 weights and a header, never the grid's
    assert all(4 * one_path < m["bytes_down"] < 4 * one_path + 64_000 for m in sites)


@pytest.mark.parametrize("grid,path", [(ONE, "p0"), ({"levels": ["embed", [0, 4], "head"],
                                                       "modules_per_level": [1, 1, 1]},
                                                      "p0-0-0")], ids=["blocks", "own-ends"])
def test_a_one_by_one_grid_trains_exactly_as_the_dense_model(demo_data, tmp_path, grid, path):
    sites = ["code", "speeches"]
    dense = simulate(small_config(demo_data, sites, eval={"at": "coordinator"}),
                     tmp_path / "dense", report=False)
    one = simulate(grid_config(demo_data, grid, sites), tmp_path / "one", report=False)
    want = load_file(tmp_path / "dense" / "model" / "model.safetensors")
    got = load_file(tmp_path / "one" / "model" / path / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[n], got[n]) for n in want)
    losses = [[r["val_loss"] for r in read_metrics(out / "metrics.jsonl")
               if r["kind"] == "round"] for out in (tmp_path / "dense", tmp_path / "one")]
    assert losses[0] == losses[1]
    assert dense.coordinator.tokens == one.coordinator.tokens


def test_sites_measure_each_path_on_their_rows_routed_to_it(demo_data, tmp_path):
    """Validation by the sites (what a deployed federation has) gives the coordinator's
    routed losses: each site measures the paths its data routes to, on its held-out rows
    routed there; a 1 x 1 grid's is the dense run's."""
    losses = {}
    for name, paths, at in [("grid-sites", GRID, "sites"), ("grid-here", GRID, "coordinator"),
                            ("one-sites", ONE, "sites"), ("dense-sites", None, "sites")]:
        cfg = small_config(demo_data, SITES, federation={"rounds": 2},
                           model={"paths": paths} if paths else {}, eval={"at": at})
        simulate(cfg, tmp_path / name, report=False)
        losses[name] = [r["val_loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")
                        if r["kind"] == "round"]
    assert losses["one-sites"] == losses["dense-sites"]
    for here, there in zip(losses["grid-here"], losses["grid-sites"], strict=True):
        assert here.keys() == there.keys() == set(SITES)
        for d in SITES:
            assert there[d] == pytest.approx(here[d], rel=1e-6), d


def test_every_path_of_the_exported_grid_loads_and_the_router_is_kept(demo_data, tmp_path,
                                                                     capsys):
    cfg = grid_config(demo_data, GRID, ["code", "shakespeare"], federation={"rounds": 1})
    simulate(cfg, tmp_path / "run", report=False)
    model = tmp_path / "run" / "model"
    index = json.loads((model / "paths.json").read_text())
    assert index["paths"] == ["p0-0", "p0-1", "p1-0", "p1-1"]
    for name in index["paths"]:
        AutoModelForCausalLM.from_pretrained(model / name)
    saved = json.loads((tmp_path / "run" / "router" / "router.json").read_text())
    assert saved == json.loads((model / "router.json").read_text())
    # atoll generate routes the prompt; atoll export copies every path in the dtype asked
    assert main(["generate", str(tmp_path / "run"), "--prompt", "def main(",
                 "--max-new-tokens", "4"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first in {f"path {name}" for name in index["paths"]}
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "pub"),
                 "--dtype", "bf16"]) == 0
    for name in index["paths"]:
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "pub" / name)
        assert next(again.parameters()).dtype == torch.bfloat16


def test_a_resumed_grid_run_equals_the_uninterrupted_one(demo_data, tmp_path):
    cfg = grid_config(demo_data, GRID, ["code", "scripture", "speeches"],
                      federation={"rounds": 4, "steps_per_round": 3},
                      comm={"up": {"kind": "int8"}})
    straight = simulate(cfg, tmp_path / "straight", report=False)
    out = tmp_path / "crashed"
    run = Run(cfg, out)
    with pytest.raises(Crash):
        run.execute(CrashingEngine([Site(s.name, s.data, out / "sites" / s.name)
                                    for s in cfg.sites], at=3))
    run.close()
    resumed = simulate(cfg, out, resume=True, report=False)
    for n, w in straight.coordinator.weights.items():
        assert torch.equal(w, resumed.coordinator.weights[n]), n
    assert comparable(read_metrics(out / "metrics.jsonl")) == \
        comparable(read_metrics(tmp_path / "straight" / "metrics.jsonl"))


def test_feature_reports_that_do_not_answer_the_request_are_refused():
    cfg = RouterConfig(dim=8, sample_rows=4)
    request = feature_requests("run", ["a"], cfg, 64, "pretraining", 0)["a"]

    def report(x, rows=10):
        return FeatureReport(run_id="run", site="a", rows=rows, features={"features": x})

    unit = torch.nn.functional.normalize(torch.rand(3, 8), dim=1)
    assert check_against_request(report(unit), request) is None
    bad = {"wrong width": torch.rand(3, 9), "too many rows": torch.rand(5, 8) / 9,
           "more than it holds": unit[:3], "NaN": unit.clone().fill_(float("nan")),
           "negative": -unit, "too long": unit * 2, "float64": unit.double()}
    for what, x in bad.items():
        rows = 2 if what == "more than it holds" else 10
        assert check_against_request(report(x, rows), request) is not None, what


@pytest.mark.parametrize("section", [
    {"comm": {"down": {"delta": True}}}, {"federation": {"fragments": 2}},
    {"privacy": {"noise_multiplier": 1.0}}])
def test_settings_a_grid_does_not_run_with_are_refused(demo_data, tmp_path, section):
    key, value = next(iter(section.items()))
    with pytest.raises(ConfigError, match="model.paths does not combine"):
        small_config(demo_data, ["code"], model={"paths": GRID},
                     **{**{"eval": {"at": "coordinator"}}, key: value})


def test_robust_rules_credit_and_the_ledger_work_module_by_module(demo_data, tmp_path):
    cfg = grid_config(demo_data, GRID, aggregation={"rule": "trimmed_mean"},
                      comm={"up": {"kind": "int8"}})
    simulate(cfg, tmp_path / "run", report=False)
    ledger = tmp_path / "run" / "ledger.sqlite"
    assert verify_ledger(ledger).ok
    updates = [e for e in read_entries(ledger) if e.kind == "update"]
    assert len(updates) == 3 * len(SITES)
    for e in updates:  # each names the modules it trained: shared, one per level
        modules = e.body["modules"]
        assert modules[0] == "l0m0" or modules[0] == "l0m1"
        assert len(modules) == 3 and "shared" in modules
        assert e.body["value"] is not None  # valued against the routed validation loss
    assert sum(s.share for s in shares(read_entries(ledger))) == pytest.approx(1.0)


def test_a_site_that_poisons_the_routing_features_is_left_out(demo_data, tmp_path):
    """Features 1000 long from one site are refused; the router is fitted on the others'
    and matches a run without that site; the liar, of whose data nothing is known, is never
    given a path, and the others train every round."""
    honest = ["code", "scripture", "speeches"]
    cfg = grid_config(demo_data, GRID, honest, federation={"rounds": 2})
    cfg.sites.append(type(cfg.sites[0])(name="liar", data=str(demo_data["shakespeare"]),
                                        fault="features_poison"))
    simulate(cfg, tmp_path / "run", report=False)
    rounds = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if r["kind"] == "round" and r["round"] > 0]
    assert [sorted(r["sites"]) for r in rounds] == [honest, honest]
    simulate(grid_config(demo_data, GRID, honest, federation={"rounds": 2}),
             tmp_path / "without", report=False)
    assert (tmp_path / "run" / "router" / "router.safetensors").read_bytes() == \
        (tmp_path / "without" / "router" / "router.safetensors").read_bytes()


def test_sites_per_path_caps_the_sites_on_each_path_each_round(demo_data, tmp_path):
    """``model.paths.sites_per_path = 1``: every round at most one site trains a path (a
    2 x 2 grid and four sites: often fewer than four train), and each module's mean takes
    only the sites that trained."""
    cfg = grid_config(demo_data, dict(GRID, sites_per_path=1), federation={"rounds": 4})
    run, engine, _ = run_recorded(cfg, tmp_path / "capped")
    paths = PathsConfig(**GRID)
    counts = []
    for plans, _ in engine.sent:
        on = Counter(parse_path(name, paths) for name, _, _ in plans.values())
        assert max(on.values()) == 1, on
        counts.append(len(plans))
    assert min(counts) < len(SITES)  # two sites drew one path at least once: one sat out
    metrics = read_metrics(tmp_path / "capped" / "metrics.jsonl")
    trained = Counter(m["round"] for m in metrics if m["kind"] == "site" and m["accepted"])
    assert [trained[r] for r in range(1, 5)] == counts
