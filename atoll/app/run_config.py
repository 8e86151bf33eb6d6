"""The whole config of a run: one dataclass tree whose parts belong to their components.

TOML is only the input format; see ``configs/demo.toml`` for a commented example and the
README's config reference for every key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from atoll.app.trackers import check_trackers
from atoll.config import ConfigError, load
from atoll.config import save as save_config
from atoll.federation.checks import ChecksConfig
from atoll.federation.codecs import CodecConfig
from atoll.federation.fault_kinds import check_fault
from atoll.federation.privacy import PrivacyConfig
from atoll.federation.robust import AggregationConfig
from atoll.federation.settings import CoordinatorConfig, FederationConfig
from atoll.ledger.credit import CreditConfig
from atoll.model import ModelConfig
from atoll.train.baselines import BASELINE_KINDS
from atoll.train.device import check_device_name
from atoll.train.inner import InnerConfig
from atoll.train.outer import OuterConfig
from atoll.util.deadlines import round_deadline_s


@dataclass
class SiteConfig:
    """One site of a simulated federation."""

    name: str
    data: str = ""
    """A directory made by ``atoll prepare`` (relative paths: to the config file). In a real
    federation the data stays on the site's machine: there, ``[[sites]]`` only names the
    sites allowed to take part, and ``data`` is left out."""
    pace_s: float = 0.0
    """Simulation only: every inner step takes at least this long (emulates slower hardware)."""
    fault: str = ""
    """Simulation only, for drills and benchmarks: make this site misbehave (sign_flip,
    scale100, noise, zero, replay, nan, shape, stale, garbage, ...; several in turn: a,b,c;
    atoll.federation.faults)."""

    def check(self) -> None:
        """Refuse an unknown fault and a name that cannot be a folder or a key's name."""
        check_fault(self.fault)
        if not self.name or any(c in self.name for c in "/\\ \t"):
            raise ValueError(f"site name {self.name!r} must be non-empty, without spaces or /")


@dataclass
class DataConfig:
    """How the sites' prepared data is read for training."""

    seq_len: int = 128
    """Tokens per training row; must divide the row length the data was prepared with."""

    def check(self) -> None:
        """Refuse rows too short to predict a next token."""
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, got {self.seq_len}")


@dataclass
class EvalSet:
    """A domain the global model is validated on besides the sites' own."""

    name: str
    data: str
    """A prepared directory; its validation split is used."""


@dataclass
class EvalConfig:
    """Validation of the global model, per domain: by the sites, or by the coordinator."""

    batch_size: int = 16
    max_batches: int = 8
    """Validation batches per domain (0 = the whole validation split)."""
    every: int = 1
    """Evaluate every this many rounds (and always after the last)."""
    sets: list[EvalSet] = field(default_factory=list)
    """Domains the coordinator evaluates on itself (held-out data it holds); with
    ``at = "coordinator"`` and none given, each site's validation split, named after the
    site (a simulation can read it)."""
    at: str = "sites"
    """``sites``: each site evaluates the global weights on its own held-out rows and
    reports loss and tokens (:mod:`atoll.federation.evaluation`; on either engine, the only
    way on a real federation); ``coordinator``: the coordinator evaluates on the data it
    can read."""

    def check(self) -> None:
        """Refuse empty batches, a negative batch limit, an interval below one round."""
        if self.batch_size < 1 or self.max_batches < 0 or self.every < 1:
            raise ValueError("eval.batch_size and eval.every must be >= 1, max_batches >= 0")
        if self.at not in ("sites", "coordinator"):
            raise ValueError(f"eval.at must be 'sites' or 'coordinator', not {self.at!r}")


@dataclass
class BaselineConfig:
    """Centralised baselines trained on the union of the sites' data at equal tokens."""

    kinds: list[str] = field(default_factory=lambda: ["data_parallel"])
    """``data_parallel`` (the sites' batches combined, same number of steps) and/or
    ``sequential`` (one site's batch, steps x sites); empty = none."""

    def check(self) -> None:
        """Refuse an unknown baseline kind."""
        for k in self.kinds:
            if k not in BASELINE_KINDS:
                kinds = ", ".join(BASELINE_KINDS)
                raise ValueError(f"unknown baseline kind '{k}' (one of {kinds})")


@dataclass
class CheckpointConfig:
    """How often the run saves a checkpoint to resume from, and how many it keeps."""

    every: int = 1
    """Checkpoint every this many rounds (resume is exact when this is 1)."""
    keep: int = 2
    """How many checkpoints to keep."""

    def check(self) -> None:
        """Refuse an interval or a count below one."""
        if self.every < 1 or self.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be at least 1")


@dataclass
class CommConfig:
    """How updates and weights move between machines (Flower engine)."""

    store: str = ""
    """fsspec URL prefix of an object store for payloads (empty = inside Flower messages)."""
    up: CodecConfig = field(default_factory=CodecConfig)
    """How sites encode their pseudo-gradients."""
    down: CodecConfig = field(default_factory=CodecConfig)
    """How the coordinator encodes the global weights it sends."""

    def check(self) -> None:
        """Refuse codec settings that only make sense the other way, and a store that is
        not a URL."""
        if self.down.topk and not self.down.delta:
            raise ValueError("comm.down.topk needs comm.down.delta = true (whole weights "
                             "cannot be sparsified, their changes can)")
        if self.up.delta:
            raise ValueError("comm.up.delta: only the downlink sends changes (updates are "
                             "changes already)")
        if self.store and "://" not in self.store:
            raise ValueError(f"comm.store must be a URL such as file:///data/atoll or "
                             f"s3://bucket/prefix, got {self.store!r}")


@dataclass
class RunConfig:
    """Everything a federated run needs, from the model to the sites."""

    name: str = "atoll"
    seed: int = 0
    purpose: str = "pretraining"
    """What this run trains for: a site reads only contributions whose consent covers it."""
    threads: int = 0
    """Torch CPU threads (0 = all cores)."""
    device: str = "auto"
    """Simulation: where the sites (and baselines) train: ``auto`` (CUDA when present),
    ``cpu``, ``cuda`` or ``cuda:N``. A deployed site names its own (``atoll site --device``)."""
    parallel: bool = False
    """Local engine: run the sites at the same time in threads, so deadlines are real."""
    report_to: list[str] = field(default_factory=list)
    """Also send the figures of ``metrics.jsonl`` to ``tensorboard``, ``wandb`` and/or
    ``mlflow`` (each an optional extra; offline by default: :mod:`atoll.app.trackers`)."""
    tokenizer: str = ""
    """A local Hugging Face tokenizer directory; empty = the byte-level tokenizer."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sites: list[SiteConfig] = field(default_factory=list)

    def check(self) -> None:
        """Refuse settings that are each fine but do not go together (and a device name
        atoll does not know)."""
        check_device_name(self.device)
        check_trackers(self.report_to)
        names = [s.name for s in self.sites]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"site name {sorted(dup)[0]!r} is used twice")
        if self.federation.time_budget_s and not self.federation.steps_per_round \
                and not self.inner.total_steps:
            raise ValueError("with a time budget and no steps_per_round cap, set "
                             "inner.total_steps (the learning-rate schedule's length)")
        f = self.federation
        if self.privacy.enabled and self.aggregation.rule != "mean":
            raise ValueError("privacy (noise_multiplier > 0) needs aggregation.rule = "
                             "\"mean\": the noise is calibrated to a clipped sum")
        if self.privacy.enabled and f.max_staleness:
            raise ValueError("privacy does not combine with federation.max_staleness: a late "
                             "update would count a site twice in a round the accountant "
                             "counts once")
        if self.comm.down.delta and (f.fragments > 1 or f.overlap_steps):
            raise ValueError("comm.down.delta does not combine with streaming sync "
                             "(federation.fragments / overlap_steps): fragments are sent whole")
        if self.model.paths.enabled:
            from atoll.app.grid_run import check_paths_combine

            check_paths_combine(self)
        if self.sites and self.federation.sites_per_round > len(self.sites):
            raise ValueError(f"federation.sites_per_round={self.federation.sites_per_round} > "
                             f"{len(self.sites)} sites")

    @property
    def total_steps(self) -> int:
        """Schedule length in inner steps (per site)."""
        if self.inner.total_steps:
            return self.inner.total_steps
        return self.federation.rounds * max(1, self.federation.steps_per_round)


def load_run_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                    base: str | os.PathLike | None = None, simulation: bool = True
                    ) -> RunConfig:
    """Load a run config; relative paths are taken relative to ``base`` (default: the
    config file's directory). A ``simulation`` needs every site's data on this machine."""
    cfg = load(RunConfig, path, overrides)
    if base is None:
        base = Path(path).resolve().parent if path is not None else Path.cwd()
    base = Path(base)
    if simulation and not cfg.sites:
        raise ConfigError(f"{path}: no [[sites]]: a simulated federation needs at least one")
    for item in [*cfg.sites, *cfg.eval.sets]:
        if item.data:
            item.data = str((base / item.data).resolve())
    if cfg.tokenizer:
        cfg.tokenizer = str((base / cfg.tokenizer).resolve())
    if cfg.model.path:
        cfg.model.path = str((base / cfg.model.path).resolve())
    if not simulation and cfg.federation.deadline_s == 0:  # a deployed round must end
        cfg.federation.deadline_s = round_deadline_s(cfg.federation.time_budget_s)
    must_exist = [*cfg.sites, *cfg.eval.sets] if simulation else cfg.eval.sets
    for item in must_exist:
        if not item.data or not Path(item.data).is_dir():
            raise ConfigError(f"{path}: data directory {item.data} of '{item.name}' does not "
                              f"exist (make it with atoll prepare)")
    return cfg


def prepare_deployed_run(out: Path, config: str | os.PathLike | None, overrides: list[str],
                         resume: bool) -> Path:
    """The resolved ``out/config.toml`` a deployed coordinator's ServerApp reads, checked
    before any process starts (the sites' data is elsewhere: no baselines)."""
    path = out / "config.toml"
    if resume:
        if not (out / "run.json").exists():
            raise FileNotFoundError(f"{out} holds no run to resume (no run.json)")
        cfg = load_run_config(path, overrides, simulation=False)
        if overrides:
            save_config(cfg, path)
        return path
    if (out / "run.json").exists():
        raise FileExistsError(f"{out} already holds a run: use --resume, or another --out")
    cfg = load_run_config(config, overrides, simulation=False)
    cfg.baseline.kinds = []
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    return path


def coordinator_config(cfg: RunConfig, run_id: str, model_config: dict) -> CoordinatorConfig:
    """The coordinator's part of a run config (its rules of a round, as the config's own
    sections), for the run ``run_id`` of a model with ``model_config``."""
    return CoordinatorConfig(
        run_id=run_id, model_config=model_config, total_steps=cfg.total_steps, seed=cfg.seed,
        purpose=cfg.purpose, seq_len=cfg.data.seq_len, federation=cfg.federation,
        inner=cfg.inner, outer=cfg.outer, up=cfg.comm.up, down=cfg.comm.down,
        checks=cfg.checks, aggregation=cfg.aggregation, privacy=cfg.privacy)
