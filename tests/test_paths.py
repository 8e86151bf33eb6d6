"""Path composition (DiPaCo): the grid of modules, its paths as ordinary Hugging Face models,
and each module's outer step over the paths through it (checked against hand-computed
values and against the dense model)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from atoll.app.paths_export import export_paths
from atoll.data.reader import TokenDataset
from atoll.federation.aggregate import WeightedMean
from atoll.model import ModelConfig
from atoll.paths.aggregate import ModuleMean
from atoll.paths.grid import (
    SHARED,
    PathsConfig,
    grid_from_dense,
    parse_path,
    path_name,
    path_weights,
    to_grid,
)
from atoll.paths.router import Router, RouterConfig, inertia, kmeans, prefix_features
from atoll.tokenizer import encode_fast, load_tokenizer
from atoll.train.outer import OuterConfig, OuterOptimizer

GRID = PathsConfig(levels=[[0, 2], [2, 4]], modules_per_level=[2, 2])


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    return ModelConfig(preset="tiny").build(load_tokenizer(), seed=0)


def _dense(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_grid_has_its_modules_and_every_path_is_a_base_model(tiny, tmp_path):
    dense = _dense(tiny)
    grid = grid_from_dense(dense, GRID)
    assert GRID.modules() == [SHARED, "l0m0", "l0m1", "l1m0", "l1m1"]
    assert len(GRID.paths()) == 4
    blocks = sum(v.numel() for k, v in dense.items() if k.startswith("model.layers."))
    shared = sum(v.numel() for k, v in dense.items() if not k.startswith("model.layers."))
    assert sum(v.numel() for v in grid.values()) == shared + 2 * blocks  # K copies a level
    path = (1, 0)
    weights = path_weights(grid, path, GRID)
    assert weights.keys() == dense.keys()
    model = LlamaForCausalLM(tiny.config)
    model.load_state_dict(weights, strict=True)  # an ordinary model of the base's shape
    model.save_pretrained(tmp_path / "p1-0")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p1-0")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(again(ids).logits, tiny(ids).logits)  # same init copied


def test_a_path_takes_its_own_module_at_each_level(tiny):
    dense = _dense(tiny)
    grid = grid_from_dense(dense, GRID)
    name = "model.layers.3.mlp.up_proj.weight"
    grid[f"l1m1/{name}"] += 1.0  # tell level 1's modules apart
    assert torch.equal(path_weights(grid, (0, 1), GRID)[name], dense[name] + 1.0)
    assert torch.equal(path_weights(grid, (0, 0), GRID)[name], dense[name])
    keys = to_grid(dense, (1, 0), GRID)
    assert {k.partition("/")[0] for k in keys} == {SHARED, "l0m1", "l1m0"}
    assert "l0m1/model.layers.1.self_attn.q_proj.weight" in keys
    assert f"l1m0/{name}" in keys
    assert parse_path(path_name((1, 0)), GRID) == (1, 0)
    with pytest.raises(ValueError, match="not a path of this grid"):
        parse_path("p2-0", GRID)


def _filled(dense: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in dense.items()}


def test_a_shared_module_gets_the_token_weighted_mean_of_its_paths(tiny):
    """Three updates: path (0,0) x 3 tokens of 1.0, path (0,1) x 1 token of 5.0, path (1,1)
    x 2 tokens of -2.0. Worked by hand: l0m0 = (3*1 + 1*5)/4 = 2; l0m1 = -2 (only the
    third); l1m0 = 1 (only the first); l1m1 = (1*5 + 2*-2)/3 = 1/3; shared = (3 + 5 - 4)/6."""
    dense = _dense(tiny)
    mean = ModuleMean(GRID, WeightedMean)
    for path, tokens, value in [((0, 0), 3, 1.0), ((0, 1), 1, 5.0), ((1, 1), 2, -2.0)]:
        mean.add(to_grid(_filled(dense, value), path, GRID), tokens)
    out = mean.result()
    want = {SHARED: 4 / 6, "l0m0": 2.0, "l0m1": -2.0, "l1m0": 1.0, "l1m1": 1 / 3}
    for key, t in out.items():
        torch.testing.assert_close(t, torch.full_like(t, want[key.split("/")[0]]))
    assert {k.split("/")[0] for k in out} == set(want)
    assert mean.weight("l1m1") == 3 and mean.weight(SHARED) == 6


def test_a_module_no_path_touched_keeps_its_weights_and_momentum(tiny):
    grid = grid_from_dense(_dense(tiny), GRID)
    outer = OuterOptimizer(grid, OuterConfig(lr=0.7, momentum=0.9))
    mean = ModuleMean(GRID, WeightedMean)
    mean.add(to_grid(_filled(_dense(tiny), 0.5), (0, 0), GRID), 10)
    before = {k: v.clone() for k, v in outer.weights.items()}
    assert outer.step(mean.result()) is None
    for key, w in outer.weights.items():
        moved = not torch.equal(w, before[key])
        assert moved == (key.split("/")[0] in (SHARED, "l0m0", "l1m0")), key


def test_a_one_by_one_grid_is_the_dense_model_bit_for_bit(tiny):
    """Two rounds of three sites' updates: DiLoCo's outer step on the dense weights with
    the plain weighted mean, and on a 1 x 1 grid with the module means."""
    one = PathsConfig(levels=[[0, 4]], modules_per_level=[1])
    dense = _dense(tiny)
    plain = OuterOptimizer(dense, OuterConfig())
    grid = OuterOptimizer(grid_from_dense(dense, one), OuterConfig())
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        a, b = WeightedMean(), ModuleMean(one, WeightedMean)
        for tokens in (96, 160, 32):
            delta = {k: torch.randn(v.shape, generator=gen) * 1e-2 for k, v in dense.items()}
            a.add(delta, tokens)
            b.add(to_grid(delta, (0,), one), tokens)
        assert plain.step(a.result()) is None and grid.step(b.result()) is None
    assembled = path_weights(grid.weights, (0,), one)
    assert assembled.keys() == plain.weights.keys()
    assert all(torch.equal(assembled[k], plain.weights[k]) for k in plain.weights)


@pytest.mark.parametrize("levels,modules,words", [
    ([[0, 2], [3, 4]], [2, 2], "follow each other"),
    ([[0, 2], [2, 3]], [2, 2], "the model has 4 blocks"),
    ([[0, 4]], [2, 2], "1 levels but 2 entries"),
    ([[0, 4]], [0], "integers >= 1"),
    (["head", [0, 4]], [2, 1], "\"head\" \\(last\\)"),
    ([[0, 4], "embed"], [1, 2], "\"embed\" \\(first\\)"),
    (["embed", "norm", [0, 4]], [2, 2, 1], "a named level"),
    (["embed", "head"], [2, 2], "no block range")])
def test_a_grid_that_does_not_tile_the_model_is_refused(levels, modules, words):
    with pytest.raises(ValueError, match=words):
        PathsConfig(levels=levels, modules_per_level=modules).check(num_layers=4)


def test_embeddings_and_head_as_levels_of_their_own(tiny):
    """``"embed"`` and ``"head"`` take what every path otherwise shares into levels with
    modules of their own; each path is still one base model, and nothing is left shared."""
    cfg = PathsConfig(levels=["embed", [0, 4], "head"], modules_per_level=[2, 1, 3])
    cfg.check(num_layers=4)
    dense = _dense(tiny)
    grid = grid_from_dense(dense, cfg)
    modules = {k.partition("/")[0] for k in grid}
    assert modules == {"l0m0", "l0m1", "l1m0", "l2m0", "l2m1", "l2m2"}  # no "shared" left
    assert {k for k in grid if k.startswith("l2m1/")} == {
        "l2m1/model.norm.weight", "l2m1/lm_head.weight"}
    assert {k for k in grid if k.startswith("l0m1/")} == {"l0m1/model.embed_tokens.weight"}
    weights = path_weights(grid, (1, 0, 2), cfg)
    assert weights.keys() == dense.keys()
    assert weights["lm_head.weight"] is grid["l2m2/lm_head.weight"]
    assert weights["model.embed_tokens.weight"] is grid["l0m1/model.embed_tokens.weight"]
    assert len(cfg.paths()) == 6
    with pytest.raises(ValueError, match="ties its input and output embeddings"):
        cfg.check(num_layers=4, tied=True)


def _domain_rows(demo_data, per_domain: int) -> tuple[np.ndarray, list[str]]:
    rows, labels = [], []
    for name, root in sorted(demo_data.items()):
        ds = TokenDataset(root, "train")
        pick = np.random.default_rng(0).choice(len(ds), per_domain, replace=False)
        rows.append(ds.rows(np.sort(pick)))
        labels += [name] * per_domain
    return np.concatenate(rows), labels


def test_product_kmeans_finds_a_product_of_clusters():
    """Rows drawn around 2 centres in the first half of the features and, independently,
    2 in the second: the four routed paths are exactly the four combinations."""
    gen = np.random.default_rng(0)
    truth = gen.integers(0, 2, size=(400, 2))
    centres = gen.normal(size=(2, 2, 8)) * 3
    x = np.concatenate([centres[0][truth[:, 0]], centres[1][truth[:, 1]]], axis=1)
    x = (x + gen.normal(scale=0.3, size=x.shape)).astype(np.float32)
    routed = Router.fit(x, GRID, RouterConfig(dim=16, kind="product")).route(x)
    pairs = set(zip(map(tuple, truth.tolist()), routed, strict=True))
    assert len(pairs) == 4 and len({p for _, p in pairs}) == 4  # a one-to-one map


def test_prefix_features_separate_the_demo_domains_better_than_chance(demo_data):
    """Four domains, one level of four modules: a cluster's rows are mostly one domain's
    (chance: 0.25). These rows are 64 bytes, fewer than the default prefix: purity 0.67
    here, against 0.91 on rows of 128 in BENCHMARKS."""
    rows, labels = _domain_rows(demo_data, 200)
    one_level = PathsConfig(levels=[[0, 4]], modules_per_level=[4])
    cfg = RouterConfig()
    routed = Router.fit(prefix_features(rows, cfg), one_level, cfg).route_rows(rows)
    clusters = {c: Counter(lab for p, lab in zip(routed, labels, strict=True) if p == c)
                for c in set(routed)}
    purity = sum(c.most_common(1)[0][1] for c in clusters.values()) / len(rows)
    assert purity > 0.55, clusters


def test_restarts_keep_the_run_of_least_inertia(demo_data):
    """k-means with restarts returns, of the single runs from the same seeds, the one whose
    rows lie closest to their centroids, and is strictly better than the worst of them here
    (single runs on these rows do stop in different optima)."""
    rows, _ = _domain_rows(demo_data, 100)
    x = torch.from_numpy(prefix_features(rows, RouterConfig()))
    singles = [kmeans(x, 4, 50, seed) for seed in range(5, 13)]
    best = kmeans(x, 4, 50, 5, restarts=8)
    scores = [inertia(x, c) for c in singles]
    assert inertia(x, best) == min(scores) < max(scores)
    assert torch.equal(best, singles[scores.index(min(scores))])


def test_routing_is_deterministic_and_saved_with_the_run(demo_data, tmp_path):
    rows, _ = _domain_rows(demo_data, 50)
    cfg = RouterConfig(seed=3)
    feats = prefix_features(rows, cfg)
    a, b = Router.fit(feats, GRID, cfg), Router.fit(feats, GRID, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.centroids, b.centroids, strict=True))
    a.save(tmp_path / "router")
    again = Router.load(tmp_path / "router")
    assert again.route_rows(rows) == a.route_rows(rows)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0)  # unit length, no raw counts
    assert feats.shape == (len(rows), cfg.dim)


def test_every_path_is_exported_as_a_model_and_a_prompt_finds_its_own(tiny, demo_data,
                                                                     tmp_path):
    from atoll.app.paths_export import load_for_prompt

    grid = grid_from_dense(_dense(tiny), GRID)
    for key in grid:  # tell the modules apart
        if not key.startswith(SHARED):
            grid[key] += 0.01 * (1 + GRID.modules().index(key.split("/")[0]))
    rows, _ = _domain_rows(demo_data, 50)
    cfg = RouterConfig()
    router = Router.fit(prefix_features(rows, cfg), GRID, cfg)
    tokenizer = load_tokenizer()
    export_paths(grid, GRID, tiny.config, tokenizer, router, tmp_path / "model")
    for path in GRID.paths():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "model" / path_name(path))
        want = path_weights(grid, path, GRID)
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    prompt = "def main(argv):\n    parser = argparse.ArgumentParser()\n    args = parser"
    model, _, path = load_for_prompt(tmp_path / "model", prompt)
    assert path == router.route_rows(encode_fast(tokenizer, prompt)[None, :])[0]
    want = path_weights(grid, path, GRID)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


@pytest.fixture
def consented_pool(tmp_path):
    """alice: research only; bob: commercial (rows of 64 tokens)."""
    from atoll.consent.pool import Pool
    from tests.test_consent import text_file

    p = Pool.open_or_create(tmp_path / "pool", seq_len=64)
    p.contribute("alice", text_file(tmp_path / "a.txt", 1), ["research"], log=lambda s: None)
    p.contribute("bob", text_file(tmp_path / "b.txt", 2), ["commercial"], log=lambda s: None)
    p.close()
    return tmp_path / "pool"


def test_a_site_samples_and_trains_only_rows_consent_allows(consented_pool, tmp_path):
    from atoll.consent.pool import consent_filter
    from atoll.paths.site_rows import route_split, rows_of_path, sample_features, tokens_per_path

    ds = TokenDataset(consented_pool, "train")
    allow = consent_filter(consented_pool, "commercial")
    bob = {int(s) for s in np.unique(ds.source_of(np.arange(len(ds)))) if allow(int(s))}
    assert 0 < len(bob) < len(ds.sources)  # consent really cuts something here
    cfg = RouterConfig(sample_rows=40)
    sample = sample_features(ds, cfg, seed=0, allow=allow)
    allowed = np.flatnonzero(np.isin(ds.source_of(np.arange(len(ds))), list(bob)))
    pick = np.sort(np.random.default_rng(0).choice(allowed, size=40, replace=False))
    np.testing.assert_array_equal(sample, prefix_features(ds.rows(pick), cfg))  # bob's only
    router = Router.fit(sample, GRID, cfg)
    routes = route_split(ds, router, GRID, cache=tmp_path / "state")
    assert len(list((tmp_path / "state").glob("routes-*.npy"))) == 1
    np.testing.assert_array_equal(route_split(ds, router, GRID, cache=tmp_path / "state"),
                                  routes)  # from the cache
    trained = np.concatenate([rows_of_path(routes, p, GRID, ds, allow) for p in GRID.paths()])
    assert sorted(trained.tolist()) == allowed.tolist()  # a partition of the allowed rows
    assert sum(tokens_per_path(routes, GRID, ds, allow).values()) == len(allowed) * 64


def test_a_site_trains_its_paths_in_proportion_to_its_tokens_and_only_those():
    from atoll.paths.planning import assign_paths

    tokens = {"a": {(0, 0): 3000, (1, 1): 1000}, "b": {(0, 1): 500}, "c": {(1, 0): 0}}
    drawn = [assign_paths(tokens, r, seed=7) for r in range(1, 2001)]
    assert all("c" not in d for d in drawn)  # nothing routed to it: no path
    assert {d["b"] for d in drawn} == {(0, 1)}
    share = sum(d["a"] == (0, 0) for d in drawn) / len(drawn)
    assert abs(share - 0.75) < 0.03  # 3000 of its 4000 tokens (binomial sd 0.01)
    assert drawn[41] == assign_paths(tokens, 42, seed=7)  # a resumed run draws the same


def test_sites_per_path_keeps_a_seeded_sample_of_each_crowded_path():
    from atoll.paths.planning import cap_sites

    drawn = {"a": (0, 0), "b": (0, 0), "c": (0, 0), "d": (1, 1), "e": (0, 1), "f": (0, 1)}
    kept = [cap_sites(drawn, 2, r, seed=3) for r in range(1, 401)]
    for k in kept:
        on = Counter(k.values())
        assert on[(0, 0)] == 2 and on[(0, 1)] == 2 and on[(1, 1)] == 1  # at most 2 a path
        assert all(drawn[s] == p for s, p in k.items())  # nobody moved to another path
        assert k["d"] == (1, 1)  # alone on its path: always kept
    # which two of a, b, c train is drawn afresh each round, each about as often
    times = Counter(s for k in kept for s in k if s in "abc")
    assert all(abs(times[s] / 400 - 2 / 3) < 0.08 for s in "abc"), times
    assert kept[9] == cap_sites(drawn, 2, 10, seed=3)  # a resumed run keeps the same
    # a path's sample depends only on who drew it: another path's crowd changes nothing
    fewer = {s: p for s, p in drawn.items() if s != "f"}
    assert all({s for s in cap_sites(fewer, 2, r, 3) if s in "abc"} ==
               {s for s in kept[r - 1] if s in "abc"} for r in range(1, 401))
    assert cap_sites(drawn, 0, 1, seed=3) == drawn
