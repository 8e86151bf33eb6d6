"""Differential privacy for each site's contribution to the model (DP-FedAvg).

With ``privacy.noise_multiplier`` = sigma > 0, the coordinator clips every update to L2 norm
``privacy.clip`` = C, sums them (each site counts once: no one can buy influence with a token
count), adds Gaussian noise N(0, (sigma C)^2) to every coordinate of the sum and divides by
the number of sites planned for the round (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"). One site's whole round, whatever data it holds, then
moves the aggregate by at most C / n, hidden in noise of scale sigma C / n: site-level
(epsilon, delta)-DP for every site, and so for every contributor at that site.

The budget is tracked by the RDP accountant of Opacus (Mironov 2017), one step per round
with sampling rate ``sites_per_round / sites`` (1 when every site trains every round; the
accountant assumes Poisson sampling, which a fixed-size sample approximates).

The noise comes from the operating system's randomness, never from the run's seed: noise an
observer could regenerate protects nothing. A DP run is therefore not bit-reproducible.
"""

from __future__ import annotations

import math
import os
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from atoll.federation.checks import global_norm

TEST_SEED_ENV = "ATOLL_TEST_NOISE_SEED"
"""Set to 1 by the test suite alone: only then may ``privacy.seed`` fix the noise."""


@dataclass
class PrivacyConfig:
    """Site-level differential privacy (off unless ``noise_multiplier`` > 0)."""

    noise_multiplier: float = 0.0
    """sigma: noise standard deviation as a multiple of ``clip`` (0 = no DP)."""
    clip: float = 1.0
    """C: L2 bound on each site's update."""
    delta: float = 1e-5
    """The delta of the reported (epsilon, delta)."""
    seed: int = -1
    """Testing only: draw the noise from this seed (-1 = the operating system's randomness;
    noise anyone can regenerate protects nothing). Refused unless ``ATOLL_TEST_NOISE_SEED=1``
    is in the environment, as atoll's own tests set it."""

    @property
    def enabled(self) -> bool:
        """Whether updates are clipped and noised (a positive noise multiplier)."""
        return self.noise_multiplier > 0

    def settings(self) -> dict[str, float]:
        """What the guarantee depends on (a resume that changes it is written in the
        ledger)."""
        return {"noise_multiplier": self.noise_multiplier, "clip": self.clip,
                "delta": self.delta}

    def check(self) -> None:
        """Refuse a negative noise multiplier, a clip bound that is not positive, a delta
        outside (0, 1)."""
        if self.noise_multiplier < 0 or self.clip <= 0 or not 0 < self.delta < 1:
            raise ValueError("privacy.noise_multiplier >= 0, privacy.clip > 0 and "
                             "privacy.delta in (0, 1)")
        if self.seed >= 0 and os.environ.get(TEST_SEED_ENV) != "1":
            raise ValueError("privacy.seed is for atoll's own tests: noise anyone can "
                             "regenerate protects nothing (leave it out)")


def clip_scale(norm: float, bound: float) -> float:
    """The factor that brings an update of L2 norm ``norm`` down (never up) to ``bound``."""
    return min(1.0, bound / norm) if norm > 0 else 1.0


def clip_update(delta: Mapping[str, torch.Tensor], bound: float) -> dict[str, torch.Tensor]:
    """``delta`` scaled down (never up) to global L2 norm ``bound``."""
    scale = clip_scale(global_norm(delta), bound)
    return {k: v.float() * scale for k, v in delta.items()}


class PrivateMean:
    """Clipped sum plus Gaussian noise, over the planned number of sites; holds one model
    (an update is read one tensor at a time, twice: for its norm, then to add it clipped;
    the noise is added in place, one tensor of it at a time)."""

    def __init__(self, cfg: PrivacyConfig, planned: int, round_: int = 0,
                 generator: torch.Generator | None = None) -> None:
        self.cfg = cfg
        self.planned = max(planned, 1)
        seed = cfg.seed * 1_000_003 + round_ if cfg.seed >= 0 else secrets.randbits(63)
        self.generator = generator or torch.Generator().manual_seed(seed)
        self._sum: dict[str, torch.Tensor] | None = None
        self._released: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Clip ``delta`` to the L2 bound and add it to the sum; every site weighs the same."""
        del weight  # every site counts once
        if self._released is not None:
            raise RuntimeError("add() after result(): the noised sum was released")
        scale = clip_scale(global_norm(delta), self.cfg.clip)
        if self._sum is None:
            self._sum = {}
        for k, v in delta.items():
            if k not in self._sum:
                self._sum[k] = torch.zeros_like(v, dtype=torch.float32)
            self._sum[k].add_(v.float() * scale)

    @torch.no_grad()
    def result(self) -> dict[str, torch.Tensor] | None:
        """The noised sum divided by the sites planned, or None when no update came (noised
        once: the same release on every call)."""
        if self._sum is None:
            return None
        if self._released is None:
            std = self.cfg.noise_multiplier * self.cfg.clip
            for v in self._sum.values():
                v.add_(torch.normal(0.0, std, v.shape, generator=self.generator))
                v.div_(self.planned)
            self._released = self._sum
        return self._released


def epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """The epsilon spent for ``delta`` after noisy rounds given as (noise multiplier,
    sampling rate, rounds) triples, composed by Opacus' RDP accountant (infinite once any
    round had no noise)."""
    from opacus.accountants import RDPAccountant

    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf  # a round without noise: nothing bounds what it reveals
    accountant = RDPAccountant()
    accountant.history = history
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": epsilon is
        warnings.simplefilter("ignore")  # then enormous anyway, the bound is still valid
        return float(accountant.get_epsilon(delta=delta))


class PrivacyBudget:
    """The privacy a run has spent: one (noise multiplier, sampling rate) per round whose
    aggregate was made, composed by the RDP accountant.

    Once a round was private every later round is accounted, so DP switched off on a resume
    makes epsilon unbounded rather than quietly frozen; settings that differ from the
    checkpoint's are kept in :attr:`change` for the ledger and the report."""

    def __init__(self, cfg: PrivacyConfig) -> None:
        self.cfg = cfg
        self.history: list[tuple[float, float]] = []
        self.change: dict[str, dict[str, float]] | None = None

    @property
    def accounted(self) -> bool:
        """Whether rounds count against a budget (DP on now, or on in an earlier round)."""
        return self.cfg.enabled or bool(self.history)

    def spend(self, sample_rate: float) -> None:
        """A round's aggregate was made with the current settings."""
        if self.accounted:
            self.history.append((self.cfg.noise_multiplier, sample_rate))

    def epsilon(self) -> float:
        """Privacy spent so far: epsilon for ``privacy.delta``."""
        return epsilon([(s, q, 1) for s, q in self.history], self.cfg.delta)

    def state_dict(self) -> dict:
        """The rounds spent and the settings in force (for a checkpoint)."""
        return {"privacy_history": [list(h) for h in self.history],
                "privacy": self.cfg.settings()}

    def load_state_dict(self, state: dict) -> None:
        """Back to a checkpoint; note a change of settings since it was made."""
        self.history = [(float(s), float(q)) for s, q in state.get("privacy_history", [])]
        before = state.get("privacy")
        if before is not None and dict(before) != self.cfg.settings():
            self.change = {"from": dict(before), "to": self.cfg.settings()}
