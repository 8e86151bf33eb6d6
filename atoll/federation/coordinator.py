"""The coordinator: plans rounds, checks and folds in updates, takes the outer step.

It holds the global weights, the outer optimizer and the schedule clock, and nothing about
how messages travel. A round is a transaction (torchft's lesson): :meth:`open_round` makes
the plans, :meth:`accept` checks each update and adds it to a streaming mean, and
:meth:`close` applies the outer step only with what was accepted. A round in which nothing
valid arrived leaves the global weights untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from atoll.federation.aggregate import WeightedMean
from atoll.federation.checks import ChecksConfig, UpdateGuard, check_delta, check_header
from atoll.federation.codecs import CodecConfig, decode, encode, parse_spec, round_seed
from atoll.federation.downlink import Downlink
from atoll.federation.fragments import fragment_of_round, split_fragments
from atoll.federation.privacy import PrivacyConfig, PrivateMean, epsilon
from atoll.federation.protocol import RoundPlan, SiteUpdate
from atoll.federation.robust import AggregationConfig, RobustAggregate
from atoll.train.inner import InnerConfig
from atoll.train.outer import OuterConfig, OuterOptimizer
from atoll.util.errors import WireError
from atoll.util.hashing import tensors_digest


@dataclass
class FederationConfig:
    """How rounds are run."""

    rounds: int = 10
    steps_per_round: int = 50
    """Inner steps per site per round (H). With a time budget: a cap (0 = none)."""
    time_budget_s: float = 0.0
    """> 0: each site trains for this many seconds per round instead of a step count."""
    sites_per_round: int = 0
    """Sample this many of the available sites each round (0 = all)."""
    deadline_s: float = 0.0
    """Close a round this many seconds after it opened, with whoever reported (0 = wait)."""
    min_sites: int = 1
    """Do not open a round before this many sites are connected (Flower engine)."""
    max_staleness: int = 0
    """Accept an update that missed its round's deadline up to this many rounds late."""
    staleness_exponent: float = 1.0
    """A late update's weight is ``tokens / (1 + lateness) ** staleness_exponent``."""
    fragments: int = 1
    """Streaming sync: cut the model into this many fragments and sync one per round."""
    overlap_steps: int = 0
    """Streaming sync: sites train this many steps while a fragment is on the wire."""
    merge_alpha: float = 0.5
    """How much of its own fragment a site keeps when merging after overlap."""

    def check(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"federation.rounds must be at least 1, got {self.rounds}")
        if self.steps_per_round < 0 or self.time_budget_s < 0 or self.sites_per_round < 0:
            raise ValueError("federation.steps_per_round, time_budget_s and sites_per_round "
                             "must be >= 0")
        if self.steps_per_round == 0 and self.time_budget_s == 0:
            raise ValueError("set federation.steps_per_round or federation.time_budget_s")
        if self.min_sites < 1:
            raise ValueError(f"federation.min_sites must be at least 1, got {self.min_sites}")
        if self.fragments < 1 or self.overlap_steps < 0 or not 0 <= self.merge_alpha < 1:
            raise ValueError("federation.fragments >= 1, overlap_steps >= 0, merge_alpha in "
                             "[0, 1)")
        if self.overlap_steps and (self.time_budget_s or
                                   self.overlap_steps >= self.steps_per_round):
            raise ValueError("federation.overlap_steps needs fixed-step rounds with "
                             "steps_per_round > overlap_steps")
        if self.max_staleness < 0 or self.staleness_exponent < 0:
            raise ValueError("federation.max_staleness and staleness_exponent must be >= 0")
        if self.deadline_s < 0:
            raise ValueError(f"federation.deadline_s must be >= 0, got {self.deadline_s}")


@dataclass
class RoundOutcome:
    """What a closed round did."""

    round: int
    planned: list[str]
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    late: list[str] = field(default_factory=list)
    """Sites whose update from an earlier round arrived in this one and was applied."""
    tokens: int = 0
    steps: int = 0
    train_loss: float | None = None
    applied: bool = False
    """Whether the outer step was taken (False when no valid update arrived)."""
    norms: dict[str, float] = field(default_factory=dict)
    """L2 norm of each counted update (the yardstick of checks.max_norm_ratio and of
    privacy.clip)."""
    epsilon: float | None = None
    """With differential privacy: the budget spent after this round."""


class Coordinator:
    """Owns the global model state of a federation and the rules of a round."""

    def __init__(self, weights: dict[str, torch.Tensor], *, run_id: str, seed: int,
                 federation: FederationConfig, outer: OuterConfig, inner: InnerConfig,
                 model_config: dict, seq_len: int, total_steps: int,
                 up: CodecConfig | None = None, down: CodecConfig | None = None,
                 purpose: str = "pretraining", checks: ChecksConfig | None = None,
                 aggregation: AggregationConfig | None = None,
                 privacy: PrivacyConfig | None = None,
                 audit: Callable[[SiteUpdate, dict[str, torch.Tensor]], str | None] | None = None
                 ) -> None:
        self.run_id = run_id
        self.purpose = purpose
        # A last check of a decoded, well-formed update by whoever keeps the books (the
        # contribution ledger): its reason to refuse it, or None.
        self.audit = audit
        self.guard = UpdateGuard(checks or ChecksConfig())
        self.aggregation = aggregation or AggregationConfig()
        self.privacy = privacy or PrivacyConfig()
        self.privacy_history: list[tuple[float, float]] = []  # (sigma, q) per noisy round
        self._sample_rate = 1.0
        self.up = up or CodecConfig()
        self.down = down or CodecConfig()
        self.seed = seed
        self.cfg = federation
        self.inner = inner
        self.model_config = model_config
        self.seq_len = seq_len
        self.total_steps = total_steps
        self.outer = OuterOptimizer(weights, outer)
        self.shapes = {n: (w.shape, w.dtype) for n, w in self.outer.weights.items()}
        self.groups = split_fragments(self.outer.weights, federation.fragments)
        self._delivered: set[str] = set()  # sites whose update for the last round counted
        self.round = 0  # last closed round
        self.checkpointed = 0  # last round saved where a restart would go back to (set by
        # whoever saves checkpoints); sites keep the state to repeat the rounds after it
        self.step = 0  # schedule position at the start of the next round
        self.tokens = 0  # tokens trained into the global weights so far
        self._planned: list[str] = []
        self._mean: WeightedMean | None = None
        self._outcome: RoundOutcome | None = None
        self._loss_sum = 0.0
        self._step_sum = 0.0
        self._on_time_tokens = 0
        self._missed: dict[int, set[str]] = {}  # round -> planned sites that did not deliver
        self.downlink = Downlink(self.down)  # with comm.down.delta: the sites' copy

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return self.outer.weights

    def select(self, available: list[str]) -> list[str]:
        """The sites that train in the next round: all, or a seeded sample of k."""
        sites = sorted(available)
        k = self.cfg.sites_per_round
        self._sample_rate = k / len(sites) if k and k < len(sites) else 1.0
        if k and k < len(sites):
            rng = np.random.default_rng([self.seed, self.round + 1])
            sites = sorted(rng.choice(sites, size=k, replace=False).tolist())
        return sites

    def open_round(self, sites: list[str]) -> dict[str, RoundPlan]:
        """Start round ``self.round + 1`` with ``sites``; one plan per site."""
        r = self.round + 1
        self._planned = list(sites)
        self._mean = self._aggregate(len(sites))
        self._outcome = RoundOutcome(round=r, planned=list(sites))
        self._loss_sum = self._step_sum = 0.0
        self._on_time_tokens = 0
        inner = asdict(self.inner)
        c = self.cfg
        streaming = c.fragments > 1 or c.overlap_steps > 0
        payloads: dict[bool, dict[str, torch.Tensor]] = {}  # encoded once, shared by sites

        def weights(full: bool) -> dict[str, torch.Tensor]:
            if full not in payloads:
                names = self.weights if full else self.groups[fragment_of_round(r - 1,
                                                                                c.fragments)]
                payloads[full] = encode({n: self.weights[n] for n in names}, self.down)
            return payloads[full]

        changes = (self.downlink.advance(self.weights, r, round_seed(self.run_id, r - 1))
                   if self.down.delta else None)
        plans = {}
        for s in sites:
            # a site that delivered last round holds every fragment but the one just synced,
            # and (delta downlink) the weights sent last round
            full = not streaming or r == 1 or s not in self._delivered
            if not self.down.delta:
                down = {"weights": weights(full), "codec_down": self.down.spec}
            elif changes is not None and s in self._delivered:
                down = {"weights": changes, "codec_down": self.down.spec,
                        "changes_from": r - 1}
            else:  # no copy yet, or this site may not hold it: the copy, whole
                down = {"weights": self.downlink.whole(), "codec_down": "fp32"}
            plans[s] = RoundPlan(
                run_id=self.run_id, round=r, site=s, step=self.step,
                total_steps=self.total_steps, max_steps=c.steps_per_round,
                time_budget_s=c.time_budget_s, seed=self.seed, inner=inner,
                model_config=self.model_config, seq_len=self.seq_len, **down,
                codec_up=self.up.spec, error_feedback=self.up.error_feedback,
                feedback_decay=self.up.feedback_decay,
                fragments=c.fragments, fragment=fragment_of_round(r, c.fragments), full=full,
                overlap_steps=c.overlap_steps, merge_alpha=c.merge_alpha,
                keep_weights=self.down.delta, purpose=self.purpose,
                keep_since=self.checkpointed)
        return plans

    def _aggregate(self, planned: int) -> WeightedMean | RobustAggregate | PrivateMean:
        """Where the round's updates are combined: the token-weighted mean, a robust rule,
        or (with differential privacy) a clipped, noised sum."""
        if self.privacy.enabled:
            return PrivateMean(self.privacy, planned, self.round + 1)
        if self.aggregation.rule == "mean":
            return WeightedMean()
        return RobustAggregate(self.aggregation)

    def accept(self, update: SiteUpdate) -> str | None:
        """Check ``update`` and fold it into the round; returns the rejection reason, if any."""
        out = self._outcome
        if out is None:
            return "no round is open"
        lag = out.round - update.round
        if 0 < lag <= self.cfg.max_staleness and update.site in self._missed.get(update.round, ()):
            return self._accept_late(update, lag)
        expected = set(self._planned) - set(out.accepted)
        reason = check_header(update, self.run_id, out.round, expected, self.up.spec)
        delta, reason = self._decode(update, reason)
        if reason is not None:
            if update.site in expected:  # a later valid reply from it would still count
                out.rejected[update.site] = reason
            return reason
        out.rejected.pop(update.site, None)
        self._mean.add(delta, weight=float(update.tokens))
        out.accepted.append(update.site)
        out.tokens += update.tokens
        self._loss_sum += update.train_loss * update.tokens
        self._step_sum += update.steps * update.tokens
        self._on_time_tokens += update.tokens
        return None

    def _accept_late(self, update: SiteUpdate, lag: int) -> str | None:
        """An update that missed its deadline ``lag`` rounds ago: applied now, discounted.

        Its pseudo-gradient was computed from older weights; like a delayed gradient in
        asynchronous SGD it is applied as is, with the polynomial staleness weight of
        FedAsync (Xie et al. 2019): ``tokens / (1 + lag) ** staleness_exponent``."""
        out = self._outcome
        reason = check_header(update, self.run_id, update.round, {update.site}, self.up.spec)
        delta, reason = self._decode(update, reason)
        if reason is not None:
            out.rejected.setdefault(f"{update.site} (round {update.round})", reason)
            return reason
        self._missed[update.round].discard(update.site)
        weight = update.tokens / (1 + lag) ** self.cfg.staleness_exponent
        self._mean.add(delta, weight=weight)
        out.late.append(update.site)
        out.tokens += update.tokens
        return None

    def _decode(self, update: SiteUpdate, reason: str | None
                ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """The decoded, checked pseudo-gradient, or the reason it cannot be used."""
        if reason is not None:
            return None, reason
        shapes = {n: self.shapes[n] for n in self._synced(update.round)}
        try:
            delta = decode(update.delta, {n: s for n, (s, _) in shapes.items()},
                           parse_spec(update.codec), round_seed(self.run_id, update.round))
        except WireError as e:
            return None, f"undecodable update: {e}"
        reason = check_delta(delta, shapes)
        if reason is not None:
            return None, reason
        part = str(fragment_of_round(update.round, self.cfg.fragments))
        fingerprint = tensors_digest(update.delta)
        reason, norm = self.guard.check(update.site, delta, fingerprint, part)
        if reason is None and self.audit is not None:
            reason = self.audit(update, delta)
        if reason is not None:
            return None, reason
        self.guard.accepted(update.site, norm, fingerprint, part)  # it counts from here on
        self._outcome.norms[update.site] = norm
        return delta, None

    def _synced(self, round_: int) -> list[str]:
        """The tensors synced in ``round_`` (all of them unless streaming)."""
        return self.groups[fragment_of_round(round_, self.cfg.fragments)]

    def reject(self, site: str, reason: str) -> None:
        """Record that ``site`` failed this round (crash, timeout, undecodable reply)."""
        if self._outcome is not None and site not in self._outcome.accepted:
            self._outcome.rejected.setdefault(site, reason)

    def close(self) -> RoundOutcome:
        """Apply the outer step with the accepted updates and advance the round."""
        out = self._outcome
        if out is None:
            raise RuntimeError("close() without an open round")
        mean = self._mean.result()
        if mean is not None:
            # Where the outer step happens: the mean pseudo-gradient is theta's "gradient".
            self.outer.step(mean)
            out.applied = True
            on_time = self._on_time_tokens
            if on_time:
                out.train_loss = self._loss_sum / on_time
                # The clock advances by the token-weighted mean of the steps the on-time
                # sites took (exactly H with fixed-step rounds).
                out.steps = round(self._step_sum / on_time)
            self.step += out.steps
            self.tokens += out.tokens
            if self.privacy.enabled:  # the noisy aggregate was released: budget spent
                self.privacy_history.append((self.privacy.noise_multiplier, self._sample_rate))
        if self.privacy.enabled:
            out.epsilon = self.epsilon()
        self.guard.close_round()
        self._delivered = set(out.accepted)
        missed = set(out.planned) - set(out.accepted)
        if missed and self.cfg.max_staleness:
            self._missed[out.round] = missed
        self._missed = {r: s for r, s in self._missed.items()
                        if out.round - r < self.cfg.max_staleness and s}
        self.round = out.round
        self._outcome = self._mean = None
        return out

    def epsilon(self) -> float:
        """Privacy spent so far: epsilon for ``privacy.delta`` (RDP accountant)."""
        return epsilon([(s, q, 1) for s, q in self.privacy_history], self.privacy.delta)

    def state_dict(self) -> dict:
        missed = {str(r): sorted(s) for r, s in self._missed.items()}
        state = {"run_id": self.run_id, "round": self.round, "step": self.step,
                 "tokens": self.tokens, "delivered": sorted(self._delivered), "missed": missed,
                 "weights": dict(self.weights), "outer": self.outer.state_dict()}
        return state | self.downlink.state_dict() | {"guard": self.guard.state_dict(),
                        "privacy_history": [list(h) for h in self.privacy_history]}

    def load_state_dict(self, state: dict) -> None:
        if state["run_id"] != self.run_id:
            raise ValueError(f"checkpoint is of run {state['run_id']!r}, not {self.run_id!r}")
        with torch.no_grad():
            for n, w in self.weights.items():
                w.copy_(state["weights"][n])
        self.outer.load_state_dict(state["outer"])
        self.round = int(state["round"])
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self._missed = {int(r): set(s) for r, s in state.get("missed", {}).items()}
        self._delivered = set(state.get("delivered", []))
        self.guard.load_state_dict(state.get("guard", {}))
        self.privacy_history = [tuple(h) for h in state.get("privacy_history", [])]
        self.downlink.load_state_dict(state)
