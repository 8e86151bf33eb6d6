"""A coordinator's checkpoint: everything a restarted coordinator needs to go on exactly.

Kept apart from :mod:`atoll.federation.coordinator` (which holds the rules of a round); the
two functions here are that class's ``state_dict`` and ``load_state_dict``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from atoll.federation.coordinator import Coordinator


def checkpoint_state(c: Coordinator) -> dict[str, Any]:
    """The weights, the outer optimizer, the clocks, who holds what, the guard's history,
    the privacy budget and (a grid) the sites' tokens per path."""
    missed = {str(r): sorted(s) for r, s in c._missed.items()}
    state = {"run_id": c.run_id, "round": c.round, "step": c.step,
             "tokens": c.tokens, "delivered": sorted(c._delivered), "missed": missed,
             "weights": dict(c.weights), "outer": c.outer.state_dict(),
             "spec_id": c.spec.spec_id, "spec_holders": sorted(c._spec_holders)}
    return state | c.planner.downlink.state_dict() | {
        "guard": c.guard.state_dict()} | c.budget.state_dict() | (
        c.paths.state_dict() if c.paths else {})


def restore_checkpoint(c: Coordinator, state: dict[str, Any]) -> None:
    """Bring ``c`` back to :func:`checkpoint_state`'s ``state`` (of the same run)."""
    if state["run_id"] != c.run_id:
        raise ValueError(f"checkpoint is of run {state['run_id']!r}, not {c.run_id!r}")
    with torch.no_grad():
        for n, w in c.weights.items():
            w.copy_(state["weights"][n])
    c.outer.load_state_dict(state["outer"])
    c.round = int(state["round"])
    c.step = int(state["step"])
    c.tokens = int(state["tokens"])
    c._missed = {int(r): set(s) for r, s in state.get("missed", {}).items()}
    c._delivered = set(state.get("delivered", []))
    c.guard.load_state_dict(state.get("guard", {}))
    c.budget.load_state_dict(state)
    c.planner.downlink.load_state_dict(state)
    if c.paths is not None:
        c.paths.load_state_dict(state)
    # sites keep the spec on disk; a changed spec (a resumed run with new settings) goes
    # out again to everyone
    same_spec = state.get("spec_id") == c.spec.spec_id
    c._spec_holders = set(state.get("spec_holders", [])) if same_spec else set()
