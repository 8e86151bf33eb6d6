"""Hostile and broken sites: every bad update is rejected with its reason and leaves the
global weights exactly as if that site had not been there; robust rules and differential
privacy do what they say."""

from __future__ import annotations

import math

import pytest
import torch

from atoll.app.metrics import read_metrics
from atoll.app.simulate import simulate
from atoll.federation.privacy import PrivacyConfig, PrivateMean, clip_update
from atoll.federation.robust import AggregationConfig, RobustAggregate, trimmed_mean
from tests.conftest import small_config

HONEST = ["code", "speeches"]


def rounds_of(out):
    return [r for r in read_metrics(out / "metrics.jsonl")
            if r["kind"] == "round" and r["run"] == "federation" and r["round"] > 0]


def with_fault(demo_data, fault, **sections):
    cfg = small_config(demo_data, [*HONEST, "scripture"], **sections)
    cfg.sites[-1].fault = fault
    return cfg


@pytest.fixture(scope="module")
def clean(demo_data, tmp_path_factory):
    """The run without the misbehaving site."""
    out = tmp_path_factory.mktemp("clean")
    return simulate(small_config(demo_data, HONEST), out, report=False)


@pytest.mark.parametrize("fault, reason", [
    ("nan", "holds NaN or infinite values"),
    ("shape", "has shape"),
    ("zero", "empty update (all zeros)"),
    ("stale", "stale: for round"),
    ("garbage", "not an atoll message"),
])
def test_a_bad_update_is_rejected_and_leaves_no_trace(demo_data, tmp_path, clean, fault, reason):
    run = simulate(with_fault(demo_data, fault), tmp_path / "run", report=False)
    for r in rounds_of(tmp_path / "run"):
        assert r["sites"] == HONEST or sorted(r["sites"]) == HONEST
        assert reason in r["rejected"]["scripture"], r["rejected"]
        assert r["rejected_count"] == 1
    for n, w in clean.coordinator.weights.items():
        assert torch.equal(w, run.coordinator.weights[n]), n


def test_a_replayed_update_is_refused(demo_data, tmp_path):
    simulate(with_fault(demo_data, "replay"), tmp_path / "run", report=False)
    rounds = rounds_of(tmp_path / "run")
    assert "scripture" in rounds[0]["sites"]  # its first update is an honest one
    for r in rounds[1:]:
        assert "replay: identical to an update this site sent before" in \
            r["rejected"]["scripture"]


def test_an_outsized_update_is_refused_once_there_is_a_yardstick(demo_data, tmp_path):
    simulate(with_fault(demo_data, "scale100", federation={"rounds": 4}), tmp_path / "run",
             report=False)
    rounds = rounds_of(tmp_path / "run")
    assert "scripture" in rounds[0]["sites"]  # round 1: no recent median to compare with
    for r in rounds[1:]:
        assert "x the recent median" in r["rejected"]["scripture"], r["rejected"]


def updates(n=7, shape=(5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(shape, generator=g), "b": torch.randn(4, generator=g)}
            for _ in range(n)]


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_median_and_trimmed_mean_match_a_reference(rule):
    ups = updates()
    agg = RobustAggregate(AggregationConfig(rule=rule, trim=0.2))
    for i, u in enumerate(ups):
        agg.add(u, weight=float(i + 1))  # weights do not buy influence here
    out = agg.result()
    for name in ("w", "b"):
        stacked = torch.stack([u[name] for u in ups])
        if rule == "median":
            want = stacked.median(dim=0).values
        else:  # 7 updates, 20%: drop the lowest and highest value per coordinate
            want = stacked.sort(dim=0).values[1:-1].mean(dim=0)
        torch.testing.assert_close(out[name], want)
    assert not agg.spill.dir.exists()  # the spilled updates are gone


def test_trimmed_mean_edge_cases():
    x = torch.tensor([[1.0], [2.0], [100.0]])
    assert trimmed_mean(x, 0.1).item() == 2.0  # three or more: at least one trimmed
    assert trimmed_mean(x[:2], 0.4).item() == 1.5  # two: nothing to trim


@pytest.mark.parametrize("far", [6.0, 6000.0])
@pytest.mark.parametrize("weights, want", [
    # equal weights: tau is |0 - v| in every pass and the clipped steps sum to 3 - v, so
    # v <- v + (3 - v) / 5: 2 -> 2.2 -> 2.36 -> 2.488 (the median is 2, the mean 2.8)
    ([1.0] * 5, 2.488),
    # the last update counts twice (total 6): tau 2, 2.5, 2 and steps 3/6, 3/6, 1/6:
    # 2 -> 2.5 -> 3 -> 19/6 (the weighted mean is 20/6)
    ([1.0, 1.0, 1.0, 1.0, 2.0], 19 / 6),
])
def test_centered_clipping_matches_the_rule_worked_by_hand(weights, want, far):
    """Centered clipping (Karimireddy et al. 2021) as robust.py applies it: start at the
    coordinate-wise median, then three passes of v <- v + sum_i w_i clip(x_i - v, tau) /
    sum_i w_i, with tau the median distance |x_i - v| of the pass. Updates 0, 1, 2, 5 and
    ``far``, each cut into two tensors along the unit vector (0.6, 0.8), so that |x_i - v|
    is the distance over the whole update. The last one is clipped in every pass, so how far
    away it is does not matter (the mean would follow it past 1200 for far = 6000)."""
    agg = RobustAggregate(AggregationConfig(rule="centered_clip", clip_iterations=3))
    for x, w in zip([0.0, 1.0, 2.0, 5.0, far], weights, strict=True):
        agg.add({"a": torch.tensor([0.6 * x]), "b": torch.tensor([0.8 * x])}, weight=w)
    out = agg.result()
    torch.testing.assert_close(out["a"], torch.tensor([0.6 * want]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out["b"], torch.tensor([0.8 * want]), rtol=0, atol=1e-5)


def test_dp_noise_has_the_configured_scale_and_updates_are_clipped():
    cfg = PrivacyConfig(noise_multiplier=1.3, clip=0.5)
    shape = (400, 500)  # 200k coordinates: the sample std is within 0.5% of the truth
    small = {"w": torch.full(shape, 1e-4)}  # norm 0.045 < clip: not changed
    big = {"w": torch.full(shape, 1.0)}  # norm 447: clipped to 0.5
    assert math.isclose(float(clip_update(big, 0.5)["w"].double().norm()), 0.5, rel_tol=1e-6)
    mean = PrivateMean(cfg, planned=4, generator=torch.Generator().manual_seed(1))
    for u in (small, small, big):  # three of four planned sites reported
        mean.add(u, weight=123.0)
    out = mean.result()["w"]
    signal = (2 * 1e-4 + 0.5 / math.sqrt(400 * 500)) / 4
    noise = out - signal
    expected_std = 1.3 * 0.5 / 4
    assert abs(noise.std().item() / expected_std - 1) < 0.02
    assert abs(noise.mean().item()) < 4 * expected_std / math.sqrt(noise.numel())


def test_reported_epsilon_is_the_accountants(demo_data, tmp_path):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    cfg = small_config(demo_data, ["code", "scripture", "speeches"],
                       federation={"rounds": 3, "sites_per_round": 2},
                       privacy={"noise_multiplier": 1.1, "clip": 0.3, "delta": 1e-5})
    simulate(cfg, tmp_path / "run", report=False)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for r in rounds_of(tmp_path / "run"):
        rdp = compute_rdp(q=2 / 3, noise_multiplier=1.1, steps=r["round"], orders=orders)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
        assert r["epsilon"] == pytest.approx(eps, rel=1e-9)
    eps = [r["epsilon"] for r in rounds_of(tmp_path / "run")]
    assert eps == sorted(eps) and eps[0] > 0
    from atoll.app.html_report import write_report

    page = write_report(tmp_path / "run").read_text()
    assert f"epsilon {eps[-1]:.3g} at delta 1e-05 after 3 rounds" in page


def test_dp_needs_the_mean():
    from atoll.app.run_config import RunConfig
    from atoll.config import from_dict

    with pytest.raises(ValueError, match="needs aggregation.rule"):
        from_dict(RunConfig, {"privacy": {"noise_multiplier": 1.0},
                              "aggregation": {"rule": "median"}}).check()


@pytest.mark.slow  # two 10-round runs: about 40 s on 2 cores
def test_a_canary_is_memorised_without_dp_and_hidden_with_it(demo_data, tmp_path):
    """The Secret Sharer test (Carlini et al. 2019): one site's text carries "The vault code
    is <10 random characters>" every 400 characters. After 10 rounds the secret's
    likelihood is ranked against 199 random codes of the same form. Measured here: without
    DP the secret ranks 1st of 200 (log-loss 36.1 nats against a median of 67.1: exposure
    7.6 bits, the most there is); with site-level DP at noise multiplier 0.1 (clip 1, two
    sites) it ranks 20th with this noise seed (31st with another: exposure 2.7-3.3 bits), at
    the price of the model (validation loss 4.87 against 2.62): with two sites the noise is
    as large as what is learnt."""
    import random

    import numpy as np
    from transformers import AutoModelForCausalLM

    from atoll.data.prepare import PrepareOptions, prepare
    from atoll.data.reader import TokenDataset

    rng = random.Random(0)
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    code = lambda: "".join(rng.choice(alphabet) for _ in range(10))  # noqa: E731
    secret, prefix = code(), "The vault code is "
    rows = TokenDataset(demo_data["speeches"], "train").rows(np.arange(1500))
    text = bytes(b if 32 <= b < 127 or b == 10 else 32
                 for b in rows.reshape(-1).astype(np.uint8).tolist()).decode()
    parts = [text[i : i + 400] for i in range(0, len(text), 400)]
    (tmp_path / "canary.txt").write_text(f"\n{prefix}{secret}.\n".join(parts))
    prepare([tmp_path / "canary.txt"], tmp_path / "canary", PrepareOptions(seq_len=64),
            log=lambda s: None)
    candidates = [secret] + [code() for _ in range(199)]

    def rank_of_secret(model) -> int:
        x = torch.tensor([list((prefix + c).encode()) for c in candidates])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)
        p = len(prefix)
        nll = -logp[:, p - 1 : -1].gather(-1, x[:, p:, None])[..., 0].sum(1)
        return 1 + int((nll[1:] < nll[0]).sum())

    ranks = {}
    for sigma in (0.0, 0.1):
        cfg = small_config({"canary": tmp_path / "canary", "code": demo_data["code"]},
                           inner={"batch_size": 8, "warmup_steps": 5},
                           outer={"lr": 1.0, "momentum": 0.0, "nesterov": False},
                           federation={"rounds": 10, "steps_per_round": 10},
                           privacy={"noise_multiplier": sigma, "clip": 1.0, "seed": 7})
        simulate(cfg, tmp_path / f"run-{sigma}", report=False)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"run-{sigma}" / "model")
        ranks[sigma] = rank_of_secret(model)
    assert ranks[0.0] == 1, ranks  # memorised: more likely than all 199 others
    assert ranks[0.1] > 10, ranks  # hidden among them
