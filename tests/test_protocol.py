"""Wire format: plans and updates survive serialization; garbage is refused with a reason."""

from __future__ import annotations

import pytest
import torch

from atoll.federation.protocol import (
    RoundPlan,
    RunSpec,
    SiteUpdate,
    WireError,
    from_bytes,
    to_bytes,
)


def make_update() -> SiteUpdate:
    g = torch.Generator().manual_seed(0)
    return SiteUpdate(run_id="r", round=3, site="a",
                      delta={"w": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g)},
                      tokens=100, steps=4, train_loss=2.5, seconds=1.0, compute_seconds=0.9)


def test_update_round_trip_is_exact():
    u = make_update()
    blob = to_bytes(u)
    v = from_bytes(blob, SiteUpdate)
    assert (v.run_id, v.round, v.site, v.tokens, v.steps, v.train_loss) == \
        (u.run_id, u.round, u.site, u.tokens, u.steps, u.train_loss)
    assert all(torch.equal(u.delta[k], v.delta[k]) for k in u.delta)
    # the size on the wire is the payload plus a small header
    payload = sum(t.numel() * 4 for t in u.delta.values())
    assert payload < len(blob) < payload + 1024


def make_spec() -> RunSpec:
    return RunSpec(run_id="r", seed=3, purpose="pretraining", model_config={"x": [1, 2]},
                   inner={"lr": 0.1}, seq_len=64, total_steps=100)


def test_plan_round_trip():
    spec = make_spec()
    plan = RoundPlan(run_id="r", round=1, site="a", spec_id=spec.spec_id, step=10, steps=5,
                     time_budget_s=0.0, weights={"w": torch.ones(2, 2)}, spec=spec)
    again = from_bytes(to_bytes(plan), RoundPlan)
    assert again.spec == spec and again.spec.spec_id == plan.spec_id
    assert again.spec.inner == {"lr": 0.1} and again.spec.model_config == {"x": [1, 2]}
    assert (again.step, again.steps) == (10, 5)
    assert torch.equal(again.weights["w"], plan.weights["w"])


def test_a_later_plan_names_the_spec_without_carrying_it():
    spec = make_spec()
    plan = RoundPlan(run_id="r", round=2, site="a", spec_id=spec.spec_id, step=15, steps=5,
                     time_budget_s=0.0, weights={"w": torch.ones(2, 2)})
    first = RoundPlan(**{**plan.__dict__, "spec": spec})
    assert len(to_bytes(plan)) < len(to_bytes(first))
    assert from_bytes(to_bytes(plan), RoundPlan).spec is None
    # the id follows every field of the spec
    assert RunSpec(**{**spec.__dict__, "seq_len": 128}).spec_id != spec.spec_id


@pytest.mark.parametrize("mangle, reason", [
    (lambda b: b[: len(b) // 2], "not an atoll message"),
    (lambda b: b"\x00" * 64, "not an atoll message"),
    (lambda b: b"", "not an atoll message"),
])
def test_garbage_is_refused(mangle, reason):
    with pytest.raises(WireError, match=reason):
        from_bytes(mangle(to_bytes(make_update())), SiteUpdate)


def test_wrong_message_type_is_refused():
    with pytest.raises(WireError, match="expected a RoundPlan"):
        from_bytes(to_bytes(make_update()), RoundPlan)
