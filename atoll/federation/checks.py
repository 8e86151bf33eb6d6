"""Where an update is checked before it may touch the global weights.

A rejected update is reported with its reason and left out of the round; the others go on.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from atoll.federation.protocol import SiteUpdate


def check_header(update: SiteUpdate, run_id: str, round_: int, expected_sites: set[str],
                 codec: str) -> str | None:
    """The reason to reject ``update`` before even decoding it, or None."""
    if update.run_id != run_id:
        return f"belongs to run {update.run_id!r}, not {run_id!r}"
    if update.round != round_:
        stale = "stale: " if update.round < round_ else ""
        return f"{stale}for round {update.round}, the open round is {round_}"
    if update.site not in expected_sites:
        return f"site {update.site!r} was not asked to train in round {round_}"
    if update.tokens <= 0 or update.steps <= 0:
        return f"reports {update.tokens} tokens in {update.steps} steps"
    if update.codec != codec:
        return f"encoded with {update.codec!r}, the federation uses {codec!r}"
    return None


def check_delta(delta: Mapping[str, torch.Tensor],
                shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> tuple[str | None, float]:
    """The reason to reject a decoded pseudo-gradient (None if it may be aggregated), and
    its L2 norm: one pass that reads each tensor once (``delta`` may decode them as read)."""
    missing = sorted(set(shapes) - set(delta))
    if missing:
        return f"tensor {missing[0]!r} is missing", math.nan
    extra = sorted(set(delta) - set(shapes))
    if extra:
        return f"unexpected tensor {extra[0]!r}", math.nan
    total = 0.0
    for name, (shape, dtype) in shapes.items():
        t = delta[name]
        if t.shape != shape:
            return f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}", math.nan
        if t.dtype != dtype:
            return f"tensor {name!r} has dtype {t.dtype}, expected {dtype}", math.nan
        squares = squared_sum(t)
        # float32 values squared cannot overflow float64: the sum is finite iff every value is
        if not math.isfinite(squares):
            return f"tensor {name!r} holds NaN or infinite values", math.nan
        total += squares
    return None, math.sqrt(total)


@dataclass
class ChecksConfig:
    """Bounds an update must keep to, besides being well-formed."""

    max_norm_ratio: float = 10.0
    """Reject an update whose L2 norm exceeds this multiple of the median norm of the
    updates accepted in the last ``norm_window`` rounds (0 = no bound)."""
    norm_window: int = 3
    reject_zero: bool = True
    """Reject an all-zero update (a free rider that trained nothing)."""
    reject_replay: bool = True
    """Reject an update identical to one this site sent before (a replay)."""

    def check(self) -> None:
        """Refuse a negative norm ratio or an empty norm window."""
        if self.max_norm_ratio < 0 or self.norm_window < 1:
            raise ValueError("checks.max_norm_ratio must be >= 0 and checks.norm_window >= 1")


def global_norm(named: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors of ``named`` taken together (float64 accumulation)."""
    return math.sqrt(sum(squared_sum(t) for t in named.values()))


SQUARES_CHUNK = 1 << 22
"""Values squared at a time in float64: a bound on the temporaries, not on the tensor."""


def squared_sum(t: torch.Tensor) -> float:
    """``sum(t ** 2)`` in float64, ``SQUARES_CHUNK`` values at a time."""
    flat = t.reshape(-1)
    return sum(float(c.double().pow(2).sum()) for c in flat.split(SQUARES_CHUNK))


class UpdateGuard:
    """The coordinator's memory of recent updates, for the checks that need one: norms of
    the last rounds (median as the yardstick) and what each site already sent."""

    REPLAY_MEMORY = 8  # updates remembered per site

    def __init__(self, cfg: ChecksConfig) -> None:
        self.cfg = cfg
        # per part of the model synced (streaming fragments differ in size), per closed
        # round, the accepted updates' norms
        self.norms: dict[str, list[list[float]]] = {}
        self.seen: dict[str, list[str]] = {}
        self._round: dict[str, list[float]] = {}

    def check(self, site: str, delta: Mapping[str, torch.Tensor] | None, fingerprint: str,
              part: str = "all", norm: float | None = None) -> tuple[str | None, float]:
        """The reason to reject ``delta`` (or None) and its L2 norm (``norm``: already
        measured, and ``delta`` is not read)."""
        norm = global_norm(delta) if norm is None else norm
        if self.cfg.reject_zero and norm == 0.0:
            return "empty update (all zeros): nothing was trained", norm
        if self.cfg.reject_replay and fingerprint in self.seen.get(site, []):
            return "replay: identical to an update this site sent before", norm
        recent = [n for r in self.norms.get(part, [])[-self.cfg.norm_window:] for n in r]
        if self.cfg.max_norm_ratio and recent:
            median = statistics.median(recent)
            if median > 0 and norm > self.cfg.max_norm_ratio * median:
                return (f"norm {norm:.4g} is {norm / median:.1f}x the recent median "
                        f"{median:.4g} (limit {self.cfg.max_norm_ratio:g}x)"), norm
        return None, norm

    def accepted(self, site: str, norm: float, fingerprint: str, part: str = "all") -> None:
        """Remember an accepted update: its norm for this round's yardstick, its fingerprint
        against replays."""
        self._round.setdefault(part, []).append(norm)
        seen = self.seen.setdefault(site, [])
        seen.append(fingerprint)
        del seen[: -self.REPLAY_MEMORY]

    def close_round(self) -> None:
        """Move this round's norms into the history the next rounds are measured against."""
        for part, norms in self._round.items():
            history = self.norms.setdefault(part, [])
            history.append(norms)
            del history[: -self.cfg.norm_window]
        self._round = {}

    def state_dict(self) -> dict:
        """The guard's memory, for the coordinator's checkpoint."""
        return {"norms": self.norms, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        """Restore the memory saved by :meth:`state_dict`."""
        self.norms = {k: [list(r) for r in v] for k, v in state.get("norms", {}).items()}
        self.seen = {k: list(v) for k, v in state.get("seen", {}).items()}
