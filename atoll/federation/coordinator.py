"""The coordinator: plans rounds, checks and folds in updates, takes the outer step.

It holds the global weights, the outer optimizer and the schedule clock, and nothing about
how messages travel. A round is a transaction (torchft's lesson): :meth:`open_round` makes
the plans, :meth:`accept` checks each update and adds it to a streaming mean, and
:meth:`close` applies the outer step only with what was accepted. A round in which nothing
valid arrived leaves the global weights untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from atoll.federation.aggregate import Aggregate, round_aggregate
from atoll.federation.checks import UpdateGuard, check_delta, check_header
from atoll.federation.codecs import Decoded, parse_spec, round_seed
from atoll.federation.coordinator_state import checkpoint_state, restore_checkpoint
from atoll.federation.downlink import Downlink
from atoll.federation.fragments import fragment_of_round, split_fragments
from atoll.federation.outcome import OnTimeTally, RoundOutcome
from atoll.federation.planning import Planner
from atoll.federation.privacy import PrivacyBudget
from atoll.federation.protocol import RoundPlan, SiteUpdate, header
from atoll.federation.settings import CoordinatorConfig
from atoll.federation.wire_checks import ReplyBounds, check_against_plan, check_fields
from atoll.paths.assignment import PathAssignment, paths_spec
from atoll.train.outer import OuterOptimizer
from atoll.util.errors import WireError
from atoll.util.hashing import tensors_digest
from atoll.util.views import Renamed

MAX_WEIGHTED_NORM = 1e30
"""An update whose weight (tokens) times L2 norm exceeds this is refused: honest ones are
twenty orders of magnitude below it, and under it no sum of a round's updates can overflow
float32 (3.4e38), so a finite update cannot make the mean NaN or infinite."""


class Coordinator:
    """Owns the global model state of a federation and the rules of a round.

    Its memory does not grow with the number of sites: fp32 weights, the outer optimizer's
    state and one accumulator, plus one update at a time (:mod:`atoll.federation.memory`)."""

    def __init__(self, weights: dict[str, torch.Tensor], cfg: CoordinatorConfig,
                 audit: Callable[[SiteUpdate, dict[str, torch.Tensor]], str | None] | None = None
                 ) -> None:
        self.cfg = cfg
        self.run_id = cfg.run_id
        self.spec = cfg.run_spec()
        # A last check of a decoded, well-formed update by whoever keeps the books (the
        # contribution ledger): its reason to refuse it, or None.
        self.audit = audit
        self.ledger_head: Callable[[], dict | None] | None = None  # set by the books' keeper
        self.guard = UpdateGuard(cfg.checks)
        self.budget = PrivacyBudget(cfg.privacy)
        self._sample_rate = 1.0
        self.outer = OuterOptimizer(weights, cfg.outer)
        self.shapes = {n: (w.shape, w.dtype) for n, w in self.outer.weights.items()}
        self.groups = split_fragments(self.outer.weights, cfg.federation.fragments)
        self.planner = Planner(self.spec, cfg.down, self.groups)
        self.paths: PathAssignment | None = None  # a grid of paths: see use_paths()
        self._delivered: set[str] = set()  # sites whose update for the last round counted
        self._spec_holders: set[str] = set()  # sites known to hold self.spec
        self.round = 0  # last closed round
        self.checkpointed = 0  # last round saved where a restart would go back to (set by
        # whoever saves checkpoints); sites keep the state to repeat the rounds after it
        self.step = 0  # schedule position at the start of the next round
        self.tokens = 0  # tokens trained into the global weights so far
        self._planned: list[str] = []
        self._mean: Aggregate | None = None
        self._outcome: RoundOutcome | None = None
        self._on_time = OnTimeTally()
        self._missed: dict[int, set[str]] = {}  # round -> planned sites that did not deliver

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The global weights (the outer optimizer's parameters)."""
        return self.outer.weights

    @property
    def downlink(self) -> Downlink:
        """With ``comm.down.delta``: the coordinator's copy of the weights the sites hold."""
        return self.planner.downlink

    def use_paths(self, paths: PathAssignment) -> None:
        """Train the weights (keyed by grid keys) as a grid of paths: each site is sent, and
        answers for, the path ``paths`` gives it in a round; the spec carries the router."""
        self.paths = paths
        self.spec = self.planner.spec = dataclasses.replace(
            self.spec, paths=paths_spec(paths.cfg, paths.router))

    def select(self, available: list[str]) -> list[str]:
        """The sites that train in the next round: all (with a grid: all of whose data
        something is known, at most ``sites_per_path`` on a path), or a seeded sample of
        k of them."""
        sites = sorted(available)
        if self.paths is not None:
            sites = self.paths.trainers(sites, self.round + 1)
        k = self.cfg.federation.sites_per_round
        self._sample_rate = k / len(sites) if k and k < len(sites) else 1.0
        if k and k < len(sites):
            rng = np.random.default_rng([self.cfg.seed, self.round + 1])
            sites = sorted(rng.choice(sites, size=k, replace=False).tolist())
        return sites

    def open_round(self, sites: list[str]) -> dict[str, RoundPlan]:
        """Start round ``self.round + 1`` with ``sites``; one plan per site."""
        r = self.round + 1
        self._planned = list(sites)
        self._mean = round_aggregate(self.cfg.privacy, self.cfg.aggregation, len(sites),
                                     r, self.paths.cfg if self.paths else None)
        self._outcome = RoundOutcome(round=r, planned=list(sites))
        self._on_time = OnTimeTally()
        f = self.cfg.federation
        plans = self.planner.plans(
            r, sites, self.weights, step=self.step, steps=f.steps_per_round,
            time_budget_s=f.time_budget_s, delivered=self._delivered,
            spec_holders=self._spec_holders, keep_since=self.checkpointed,
            paths=self.paths)
        for plan in plans.values():  # the history so far, signed: the sites keep it
            plan.ledger_head = self.ledger_head() if self.ledger_head else None
        return plans

    def accept(self, update: SiteUpdate) -> str | None:
        """Check ``update`` and fold it into the round; returns the rejection reason, if any.
        Whatever goes wrong while handling it (an exception included) rejects it with the
        reason; the round goes on."""
        out = self._outcome
        if out is None:
            return "no round is open"
        try:
            check_fields(header(update))
        except WireError as e:
            return self._refuse(update, f"malformed reply: {e}")
        try:
            return self._accept(update)
        except Exception as e:  # noqa: BLE001 - no reply may stop the round
            return self._refuse(update, f"reply could not be handled ({type(e).__name__}: "
                                        f"{e})")

    def _refuse(self, update: SiteUpdate, reason: str) -> str:
        """Record ``reason`` against the planned site ``update`` names, if it is one."""
        out = self._outcome
        site = update.site if isinstance(update.site, str) else ""
        if site in out.planned and site not in out.accepted:
            out.rejected[site] = reason
        return reason

    def _accept(self, update: SiteUpdate) -> str | None:
        """:meth:`accept` for an update whose fields have their types."""
        out = self._outcome
        lag = out.round - update.round
        missed = self._missed.get(update.round, ())
        # with DP a site counts once, in the round it was planned for (as the accountant)
        late_ok = 0 < lag <= self.cfg.federation.max_staleness and not self.cfg.privacy.enabled
        if late_ok and update.site in missed:
            return self._accept_late(update, lag)
        expected = set(self._planned) - set(out.accepted)
        reason = (check_header(update, self.run_id, out.round, expected, self.cfg.up.spec)
                  or check_against_plan(update, self._bounds(out.round, update.site)))
        delta, reason = self._decode(update, reason, float(update.tokens))
        if reason is not None:
            if update.site in expected:  # a later valid reply from it would still count
                out.rejected[update.site] = reason
            return reason
        out.rejected.pop(update.site, None)
        self._mean.add(delta, weight=float(update.tokens))
        out.accepted.append(update.site)
        out.tokens += update.tokens
        self._on_time.add(update.tokens, update.train_loss, update.steps)
        self._spec_holders.add(update.site)
        return None

    def _accept_late(self, update: SiteUpdate, lag: int) -> str | None:
        """An update that missed its deadline ``lag`` rounds ago: applied now, discounted.

        Its pseudo-gradient was computed from older weights; like a delayed gradient in
        asynchronous SGD it is applied as is, with the polynomial staleness weight of
        FedAsync (Xie et al. 2019): ``tokens / (1 + lag) ** staleness_exponent``."""
        out = self._outcome
        reason = (check_header(update, self.run_id, update.round, {update.site},
                               self.cfg.up.spec)
                  or check_against_plan(update, self._bounds(update.round, update.site)))
        weight = update.tokens / (1 + lag) ** self.cfg.federation.staleness_exponent
        delta, reason = self._decode(update, reason, weight)
        if reason is not None:
            out.rejected.setdefault(f"{update.site} (round {update.round})", reason)
            return reason
        self._missed[update.round].discard(update.site)
        self._mean.add(delta, weight=weight)
        out.late.append(update.site)
        out.tokens += update.tokens
        return None

    def _bounds(self, round_: int, site: str) -> ReplyBounds:
        """What the plan ``site`` was sent for ``round_`` allows its reply to claim."""
        return ReplyBounds.of(self.spec, round_, site, self.cfg.federation.steps_per_round)

    def _decode(self, update: SiteUpdate, reason: str | None, weight: float
                ) -> tuple[Decoded | None, str | None]:
        """The checked pseudo-gradient, decoded one tensor at a time as it is read, or the
        reason it cannot be used (with ``weight`` in the mean). Checking reads each tensor
        once (shape, finite values and the norm in one pass), the audit once more, adding
        it once more: a decoded tensor at a time, never the whole update."""
        if reason is not None:
            return None, reason
        names = self._sent_names(update.site, update.round)
        if names is None:
            return None, "no path was planned for this site"
        shapes = {n: self.shapes[k] for n, k in names.items()}
        try:
            delta = Renamed(Decoded(update.delta, {n: s for n, (s, _) in shapes.items()},
                                    parse_spec(update.codec),
                                    round_seed(self.run_id, update.round)), names)
            reason, norm = check_delta(delta, {names[n]: s for n, s in shapes.items()})
        except WireError as e:
            return None, f"undecodable update: {e}"
        if reason is None and weight * norm > MAX_WEIGHTED_NORM:
            reason = (f"norm {norm:.3g} at weight {weight:.3g} exceeds the bound "
                      f"{MAX_WEIGHTED_NORM:g} under which a round's sum stays finite")
        if reason is not None:
            return None, reason
        part = str(fragment_of_round(update.round, self.spec.fragments))
        fingerprint = tensors_digest(update.delta)
        reason, norm = self.guard.check(update.site, delta, fingerprint, part, norm=norm)
        if reason is None and self.audit is not None:
            reason = self.audit(update, delta)
        if reason is not None:
            return None, reason
        self.guard.accepted(update.site, norm, fingerprint, part)  # it counts from here on
        self._outcome.norms[update.site] = norm
        return delta, None

    def _sent_names(self, site: str, round_: int) -> dict[str, str] | None:
        """The tensors of ``site``'s update for ``round_``, as it names them -> their keys
        in the weights: all, one fragment (streaming), or a path's (named as the base
        model's; None when no path was planned)."""
        if self.paths is None:
            return {n: n for n in self.groups[fragment_of_round(round_, self.spec.fragments)]}
        path = self.paths.path_of(site, round_)
        return None if path is None else self.paths.names(path)

    def reject(self, site: str, reason: str) -> None:
        """Record that ``site`` failed this round (crash, timeout, undecodable reply)."""
        if self._outcome is not None and site not in self._outcome.accepted:
            self._outcome.rejected.setdefault(site, reason)
            self._spec_holders.discard(site)  # it may have lost its state: tell it again

    def close(self) -> RoundOutcome:
        """Apply the outer step with the accepted updates and advance the round."""
        out = self._outcome
        if out is None:
            raise RuntimeError("close() without an open round")
        mean = self._mean.result()
        # Where the outer step happens: the mean pseudo-gradient is theta's "gradient". A
        # step that would leave a weight non-finite is refused: the weights stay as they were
        refused = self.outer.step(mean) if mean is not None else None
        if refused is not None:
            out.refused = refused
        elif mean is not None:
            out.applied = True
            out.train_loss, out.steps = self._on_time.loss(), self._on_time.steps()
            self.step += out.steps  # the schedule clock: the on-time sites' mean steps
            self.tokens += out.tokens
        if mean is not None:  # the aggregate was made (a refusal tells something about it
            self.budget.spend(self._sample_rate)  # too): the budget is spent
        if self.budget.accounted:
            out.epsilon = self.budget.epsilon()
        self.guard.close_round()
        self._delivered = set(out.accepted)
        missed = set(out.planned) - set(out.accepted)
        staleness = self.cfg.federation.max_staleness
        if missed and staleness:
            self._missed[out.round] = missed
        self._missed = {r: s for r, s in self._missed.items() if out.round - r < staleness and s}
        self.round = out.round
        self._outcome = self._mean = None
        return out

    def state_dict(self) -> dict:
        """Everything a restarted coordinator needs to go on exactly (a checkpoint)."""
        return checkpoint_state(self)

    def load_state_dict(self, state: dict) -> None:
        """Go back to a checkpoint made by :meth:`state_dict`."""
        restore_checkpoint(self, state)
