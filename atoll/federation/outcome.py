"""What a closed round did, and the running tally an open round keeps to get there."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    refused: str = ""
    """Why the outer step was refused (it would have made the weights non-finite), if it was."""
    norms: dict[str, float] = field(default_factory=dict)
    """L2 norm of each counted update (the yardstick of checks.max_norm_ratio and of
    privacy.clip)."""
    epsilon: float | None = None
    """With differential privacy: the budget spent after this round."""


@dataclass
class OnTimeTally:
    """Token-weighted sums over the updates that arrived in their own round."""

    tokens: int = 0
    loss_sum: float = 0.0
    step_sum: float = 0.0

    def add(self, tokens: int, loss: float, steps: int) -> None:
        """Count one on-time update."""
        self.tokens += tokens
        self.loss_sum += loss * tokens
        self.step_sum += steps * tokens

    def loss(self) -> float | None:
        """The token-weighted mean training loss (None without on-time updates)."""
        return self.loss_sum / self.tokens if self.tokens else None

    def steps(self) -> int:
        """The token-weighted mean of the steps taken (exactly H with fixed-step rounds):
        how far the schedule clock advances."""
        return round(self.step_sum / self.tokens) if self.tokens else 0
