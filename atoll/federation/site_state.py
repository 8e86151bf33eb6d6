"""What a site keeps between rounds: the run spec, the model it trains, the inner optimizer,
the data cursor, the error-feedback residual, and where all of it is saved.

The state is saved after every round under ``state_dir/round-NNNNN``. A plan for round r
starts from the newest state saved *before* r, so a round that is repeated (the coordinator
crashed and resumed) starts from exactly the same place, and the site's process may be a
fresh one each time (Flower starts one per message).

The model and its AdamW state live on the site's device; the received weights (the anchor
of the pseudo-gradient), the error-feedback residual and everything saved stay on the host,
in fp32. A site of several processes (:mod:`atoll.train.distributed`) keeps one such state
per process: the same cursor on all of them, each its own part of a sharded model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from atoll.data.reader import PackedReader, TokenDataset
from atoll.federation.codecs import ErrorFeedback
from atoll.federation.fragments import fragment_of_round, split_fragments
from atoll.federation.protocol import RoundPlan, RunSpec
from atoll.paths.site_rows import RoutedRows
from atoll.train.distributed import Parallel
from atoll.train.inner import InnerConfig, InnerTrainer
from atoll.util.atomic import write_atomic
from atoll.util.hashing import seed_of
from atoll.util.round_folders import RoundFolders
from atoll.util.storage import load_state, save_state

KEEP_STATES = 2
SPEC_FILE = "spec.json"


def data_seed(run_seed: int, site: str) -> int:
    """The seed of a site's data order: fixed by the run's seed and the site's name."""
    return seed_of(run_seed, site)


class SiteState:
    """The objects a site trains with, built for one run spec, and their saved rounds."""

    def __init__(self, name: str, data_dir: Path, state_dir: Path,
                 device: torch.device | None = None, parallel: Parallel | None = None) -> None:
        self.name = name
        self.parallel = parallel or Parallel()  # this process among the site's processes
        self.device = device or torch.device("cpu")  # where the model trains
        self.data_dir = Path(data_dir)
        self.state_dir = Path(state_dir)
        self.folders = RoundFolders(self.state_dir)
        self.spec: RunSpec | None = None  # the run spec last received (cached on disk)
        self._key: str | None = None  # the build key the objects below were made for
        self.completed: int | None = None  # round whose end state is in memory
        self.model: torch.nn.Module | None = None
        self.trainer: InnerTrainer | None = None
        self.reader: PackedReader | None = None
        self.feedback = ErrorFeedback()  # what the uplink codec dropped, carried forward
        self.anchor: dict[str, torch.Tensor] = {}  # the global weights as last received (host)
        self.yielded_base: dict[int, int] = {}  # reader's rows per source at the last save
        self.keep_anchor = False  # save the received weights too (streaming, delta downlink)
        self.shapes: dict[str, torch.Size] = {}  # the model's tensors, in model order
        self.fragments: list[list[str]] = []  # their groups for streaming sync
        self.rows: np.ndarray | None = None  # the rows it trains on (a path's); None: all

    # -- the run spec ----------------------------------------------------------------------

    def spec_for(self, plan: RoundPlan) -> RunSpec:
        """The spec ``plan`` trains under: the one it carries (kept for later plans), or the
        one this site holds under ``plan.spec_id``."""
        if plan.spec is not None:
            if plan.spec.spec_id != plan.spec_id:
                raise ValueError(f"site {self.name}: the plan's run spec does not match its "
                                 f"spec id {plan.spec_id}")
            if self.spec is None or self.spec.spec_id != plan.spec_id:
                self.spec = plan.spec
                write_atomic(self.state_dir / SPEC_FILE,
                             json.dumps(asdict(plan.spec), sort_keys=True).encode())
            return self.spec
        if self.spec is None and (self.state_dir / SPEC_FILE).exists():
            self.spec = RunSpec(**json.loads((self.state_dir / SPEC_FILE).read_text()))
        if self.spec is None or self.spec.spec_id != plan.spec_id:
            raise ValueError(f"site {self.name} does not hold run spec {plan.spec_id}; the "
                             f"coordinator sends it with the next plan")
        return self.spec

    # -- building and restoring ------------------------------------------------------------

    def build(self, spec: RunSpec) -> None:
        """Make the model, trainer and reader for ``spec`` (kept while its key holds)."""
        if spec.build_key == self._key:
            return
        cfg = AutoConfig.for_model(**spec.model_config)
        with self.device:  # made where it trains: no host copy of a large model
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        inner = InnerConfig(**spec.inner)
        forward = self.parallel.wrap(self.model)  # before the optimizer: FSDP2 shards in place
        self.trainer = InnerTrainer(self.model, inner, spec.total_steps, forward=forward)
        dataset = TokenDataset(self.data_dir, "train", spec.seq_len)
        if self.rows is not None:
            dataset = RoutedRows(dataset, self.rows)
        if dataset.manifest["vocab_size"] > cfg.vocab_size:
            raise ValueError(f"site {self.name}: data in {self.data_dir} was prepared with a "
                             f"vocabulary of {dataset.manifest['vocab_size']}, the model has "
                             f"{cfg.vocab_size}")
        self.reader = PackedReader(dataset, inner.batch_size, seed=data_seed(spec.seed,
                                                                             self.name))
        self.feedback = ErrorFeedback()
        self.anchor = {}
        self.yielded_base = {}
        self.shapes = {n: p.shape for n, p in self.model.named_parameters()}
        self.fragments = split_fragments(self.shapes, spec.fragments)
        self._key, self.completed = spec.build_key, None

    def next_batch(self) -> torch.Tensor:
        """The next batch this process trains on: its share of the reader's global batch."""
        return self.parallel.local_rows(self.reader.next_batch())

    def fragment(self, round_: int) -> list[str]:
        """The tensors round ``round_`` syncs (all of them unless streaming)."""
        return self.fragments[fragment_of_round(round_, len(self.fragments))]

    def restore(self, spec: RunSpec, round_: int) -> None:
        """Bring the in-memory state to the newest round saved before ``round_``."""
        before = [r for r in self.folders.rounds() if r < round_]
        if not before:
            if self.completed is not None:  # memory holds a later round: start afresh
                self.rebuild(spec)
            return
        latest = before[-1]
        if latest == self.completed:
            return
        state = load_state(self.folders.path(latest))
        if state["key"] != self._key:  # saved by a different run or setup: start afresh
            if self.completed is not None:
                self.rebuild(spec)
            return
        trainer = state["trainer"]
        self.trainer.load_state_dict(dict(trainer, optimizer=self.parallel.sharded_state(
            trainer["optimizer"], self.trainer.optimizer)))
        self.reader.load_state_dict(state["reader"])
        self.yielded_base = dict(self.reader.yielded)
        self.feedback.residual = dict(state.get("residual", {}))
        if state.get("local"):  # streaming: the model is not replaced whole every round
            self.parallel.load_local_weights(self.model, state["local"])
            self.anchor = dict(state["anchor"])
        self.completed = latest

    def rebuild(self, spec: RunSpec) -> None:
        """Forget what memory holds and build afresh for ``spec``."""
        self._key = None
        self.build(spec)

    def unload(self) -> None:
        """Free the model, optimizer and reader (rebuilt, and restored from disk, when next
        needed)."""
        self.model = self.trainer = self.reader = None
        self.anchor, self._key, self.completed = {}, None, None

    def forget_round(self) -> None:
        """Memory no longer holds a saved round's end state (it trained on past it)."""
        self.completed = None

    # -- saving ----------------------------------------------------------------------------

    def rows_read(self) -> dict[int, int]:
        """Rows the reader yielded per source since the last save (this round's reading)."""
        return {s: n - self.yielded_base.get(s, 0) for s, n in self.reader.yielded.items()}

    def save(self, round_: int, keep_since: int = 0) -> None:
        """Save the end state of ``round_``; keep what a repeat of round ``keep_since + 1``
        and later would start from."""
        state = {"key": self._key, "round": round_,
                 "trainer": self.parallel.local_state(self.trainer.state_dict()),
                 "reader": self.reader.state_dict(), "residual": self.feedback.residual,
                 "saved_at": time.time()}
        if self.keep_anchor:
            state["local"] = self.parallel.local_weights(self.model)
            state["anchor"] = dict(self.anchor)
        save_state(state, self.folders.path(round_))
        self.yielded_base = dict(self.reader.yielded)
        self.completed = round_
        saved = self.folders.rounds()
        # a repeat of round keep_since + 1 starts from the newest state up to keep_since
        floor = max([r for r in saved if r <= keep_since], default=0)
        self.folders.prune(KEEP_STATES, below=floor)
