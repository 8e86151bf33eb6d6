"""The coordinator's settings: how rounds run, and the one object a coordinator is built from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from atoll.federation.checks import ChecksConfig
from atoll.federation.codecs import CodecConfig
from atoll.federation.privacy import PrivacyConfig
from atoll.federation.protocol import RunSpec
from atoll.federation.robust import AggregationConfig
from atoll.train.inner import InnerConfig
from atoll.train.outer import OuterConfig


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
        """Refuse settings no round could run with, naming the key."""
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
class CoordinatorConfig:
    """Everything a :class:`~atoll.federation.coordinator.Coordinator` needs: the run's
    identity and model, and the parts of the run config that set the rules of a round."""

    run_id: str
    model_config: dict[str, Any]
    """Hugging Face config of the model, sent to the sites in the run spec."""
    total_steps: int
    """Length of the learning-rate schedule, in inner steps."""
    seed: int = 0
    purpose: str = "pretraining"
    seq_len: int = 128
    federation: FederationConfig = field(default_factory=FederationConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    up: CodecConfig = field(default_factory=CodecConfig)
    """How sites encode their pseudo-gradients."""
    down: CodecConfig = field(default_factory=CodecConfig)
    """How the coordinator encodes the weights it sends."""
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def run_spec(self) -> RunSpec:
        """What every site is told once per run."""
        f = self.federation
        return RunSpec(run_id=self.run_id, seed=self.seed, purpose=self.purpose,
                       model_config=self.model_config, inner=asdict(self.inner),
                       seq_len=self.seq_len, total_steps=self.total_steps,
                       codec_up=self.up.spec, error_feedback=self.up.error_feedback,
                       feedback_decay=self.up.feedback_decay, fragments=f.fragments,
                       overlap_steps=f.overlap_steps, merge_alpha=f.merge_alpha,
                       keep_weights=self.down.delta)
