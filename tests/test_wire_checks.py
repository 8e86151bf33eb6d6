"""A reply header checked field by field; a reply that cannot be handled rejected, never
raised; an outer step that would make the weights non-finite refused, state untouched."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from atoll.federation.checks import ChecksConfig
from atoll.federation.coordinator import Coordinator
from atoll.federation.faults import mangle_header
from atoll.federation.protocol import SiteUpdate, header, tensor_bytes
from atoll.federation.settings import CoordinatorConfig, FederationConfig
from atoll.federation.wire_checks import (
    ReplyBounds,
    check_against_plan,
    check_fields,
    checked_update,
    parse_header,
)
from atoll.train.inner import InnerConfig
from atoll.train.outer import OuterConfig, OuterOptimizer
from atoll.util.errors import WireError
from tests.test_federation import update

# InnerConfig(): batch_size 16, grad_accum 1; seq_len 8: 128 tokens a step, 2 steps a round
BOUNDS = ReplyBounds("run", 1, "a", "fp32", max_steps=2, tokens_per_step=128)


def head(**changes) -> dict:
    """A valid reply header for site a's round 1, with ``changes``."""
    return {**header(update("a", tokens=256)), **changes}


def as_update(h: dict) -> SiteUpdate:
    """The update a header describes (no type checks: what a careless engine would make)."""
    return SiteUpdate(**{k: v for k, v in h.items() if k not in ("v", "type")},
                      delta=update("a").delta)


def test_a_valid_header_passes():
    h = head()
    check_fields(h)
    u = checked_update(parse_header(json.dumps(h)), tensor_bytes(update("a").delta), "a")
    assert check_against_plan(u, BOUNDS) is None


@pytest.mark.parametrize("field, value, words", [
    ("round", "1", "'round' must be an integer"),
    ("round", True, "'round' must be an integer"),
    ("tokens", -5, "'tokens' must be an integer >= 0"),
    ("tokens", 1.5e308, "'tokens' must be an integer"),
    ("steps", None, "'steps' must be an integer"),
    ("train_loss", float("nan"), "'train_loss' must be a finite number"),
    ("seconds", float("inf"), "'seconds' must be a finite number >= 0"),
    ("site", ["a"], "'site' must be a string"),
    ("codec", "x" * 5000, "'codec' must be a string of at most"),
    ("receipt", "signed", "'receipt' must be an object"),
    ("surprise", 1, "unexpected header field 'surprise'"),
    ("type", "RoundPlan", "expected a SiteUpdate"),
])
def test_each_field_is_refused_with_its_reason(field, value, words):
    with pytest.raises(WireError, match=words):
        check_fields(head(**{field: value}))


def test_a_missing_field_is_named():
    h = head()
    del h["steps"]
    with pytest.raises(WireError, match="'steps' is missing"):
        check_fields(h)


@pytest.mark.parametrize("text, words", [
    ('{"a": NaN}', "NaN"), ('{"a": Infinity}', "Infinity"), ('{"a": -Infinity}', "Infinity"),
    ("[" * 100_000 + "]" * 100_000, "nested 100000 deep"),
    ('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', None),  # brackets in a string
    ("[1, 2]", "not an object"), ("{", "not JSON"), ("x" * (9 << 20), "bytes, the limit"),
])
def test_header_json_is_parsed_safely(text, words):
    if words is None:
        assert parse_header(text) == json.loads(text)
        return
    with pytest.raises(WireError, match=words):
        parse_header(text)


@pytest.mark.parametrize("changes, words", [
    ({"round": 2}, "its plan was for round 1"),
    ({"site": "b"}, "claims to be site 'b'"),
    ({"codec": "int8/64"}, "encoded with 'int8/64'"),
    ({"run_id": "other"}, "belongs to run 'other'"),
    ({"steps": 3, "tokens": 384}, "reports 3 steps, its plan allowed 1..2"),
    ({"steps": 0}, "reports 0 steps"),
    ({"tokens": 257}, "reports 257 tokens in 2 steps; at most 256"),
    ({"tokens": 0}, "reports 0 tokens"),
])
def test_claims_beyond_the_plan_are_refused(changes, words):
    assert words in check_against_plan(as_update(head(**changes)), BOUNDS)


def test_the_sender_is_the_site_not_the_message():
    blob = tensor_bytes(update("a").delta)
    with pytest.raises(WireError, match="claims to be site 'b', but was sent by the node of "
                                        "site 'a'"):
        checked_update(head(site="b"), blob, sender="a")


def coordinator(outer: OuterConfig | None = None, max_norm_ratio: float = 10.0
                ) -> Coordinator:
    weights = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    return Coordinator(weights, CoordinatorConfig(
        run_id="run", seed=1, model_config={}, seq_len=8, total_steps=10,
        federation=FederationConfig(rounds=5, steps_per_round=2),
        outer=outer or OuterConfig(lr=0.7, momentum=0.9, nesterov=True), inner=InnerConfig(),
        checks=ChecksConfig(max_norm_ratio=max_norm_ratio)))


@pytest.mark.parametrize("fault", ["header_nan", "header_bad_type", "header_huge_tokens",
                                   "header_huge_steps", "header_wrong_round"])
def test_a_hostile_header_is_rejected_and_the_round_goes_on(fault):
    c = coordinator()
    c.open_round(["a", "b"])
    reason = c.accept(as_update(mangle_header(head(), fault)))
    assert reason and c.accept(update("b", value=2.0)) is None
    out = c.close()
    assert out.accepted == ["b"] and out.rejected["a"] == reason and out.applied


def test_an_exception_while_handling_a_reply_rejects_it():
    c = coordinator()
    c.audit = lambda u, d: 1 / 0  # a book-keeper that breaks on this reply
    c.open_round(["a", "b"])
    assert "ZeroDivisionError" in c.accept(update("a"))
    c.audit = None
    assert c.accept(update("b")) is None
    out = c.close()
    assert "could not be handled" in out.rejected["a"] and out.accepted == ["b"]


def test_a_finite_update_that_would_overflow_the_mean_is_refused():
    c = coordinator()
    c.open_round(["a", "b"])
    assert "exceeds the bound" in c.accept(update("a", value=1e37, tokens=256))
    assert c.accept(update("b")) is None
    assert c.close().applied and all(torch.isfinite(w).all() for w in c.weights.values())


def test_an_outer_step_to_non_finite_state_is_refused_keeping_weights_and_momentum():
    # no norm yardstick (an operator's choice): only the finiteness check stands in the way
    c = coordinator(OuterConfig(optimizer="adam", lr=0.1, momentum=0.9, nesterov=False),
                    max_norm_ratio=0)
    c.open_round(["a"])
    assert c.accept(update("a", value=1e-3, tokens=10)) is None  # builds momentum
    assert c.close().applied
    before = copy.deepcopy(c.state_dict())
    c.open_round(["a"])
    # finite and within every bound, yet (1 - beta2) * g * g passes float32's largest: the
    # second moment would turn infinite and freeze the model for good
    assert c.accept(update("a", round_=2, value=1e21, tokens=10)) is None
    out = c.close()
    assert not out.applied and out.refused == ("the outer step would make the optimizer's "
                                               "exp_avg_sq of tensor 'w' non-finite: step "
                                               "refused")
    after = c.state_dict()
    assert all(torch.equal(before["weights"][n], after["weights"][n]) for n in c.weights)
    assert str(before["outer"]) == str(after["outer"]) and c.step == before["step"]
    c.open_round(["a"])  # the run goes on from the weights it kept
    assert c.accept(update("a", round_=3, value=2e-3, tokens=10)) is None
    assert c.close().applied and all(torch.isfinite(w).all() for w in c.weights.values())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_finiteness_check_takes_the_real_steps_arithmetic(optimizer):
    """The check steps copies with an optimizer of the same kind: where the real step is
    finite it is allowed, and it lands where torch's own optimizer lands."""
    torch.manual_seed(0)
    cfg = OuterConfig(optimizer=optimizer, lr=0.7, momentum=0.9, nesterov=optimizer == "sgd")
    w0 = {"a": torch.randn(4, 3), "b": torch.randn(5)}
    ours = OuterOptimizer(w0, cfg)
    ref = {n: w.clone() for n, w in w0.items()}
    torch_opt = cfg.build(list(ref.values()))
    for _ in range(3):
        g = {n: torch.randn_like(w) for n, w in w0.items()}
        assert ours.step(g) is None
        for n, w in ref.items():
            w.grad = g[n].clone()
        torch_opt.step()
    assert all(torch.equal(ours.weights[n], ref[n]) for n in ref)
