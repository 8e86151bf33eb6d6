"""A site: private data plus local compute. Takes a RoundPlan, trains, returns a SiteUpdate.

A site needs only its data directory and a directory for its own state. Everything else (the
model, the training settings, the schedule position) arrives with the plan, so a site can
join a running federation at any round.

The state a site keeps between rounds (inner AdamW state, data cursor) is saved after every
round under ``state_dir/round-NNNNN``. A plan for round r starts from the newest state saved
*before* r, so a round that is repeated (the coordinator crashed and resumed) starts from
exactly the same place, and the site's process may be a fresh one each time (Flower).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from atoll.consent.pool import allowed_sources
from atoll.data.reader import PackedReader, TokenDataset
from atoll.federation.codecs import ErrorFeedback, decode, encode, parse_spec, round_seed
from atoll.federation.faults import check_fault, corrupt_delta, delta_fault
from atoll.federation.fragments import fragment_of_round, split_fragments
from atoll.federation.protocol import RoundPlan, SiteUpdate
from atoll.ledger.receipts import build_receipt, sign_receipt
from atoll.ledger.signing import Signer
from atoll.train.inner import InnerConfig, InnerTrainer, TrainResult
from atoll.util.hashing import seed_of
from atoll.util.storage import load_state, save_state

KEEP_STATES = 2
_ROUND_DIR = re.compile(r"^round-(\d{5,})$")


def data_seed(run_seed: int, site: str) -> int:
    """The seed of a site's data order: fixed by the run's seed and the site's name."""
    return seed_of(run_seed, site)


class Site:
    """One member of a federation, with data that never leaves it."""

    def __init__(self, name: str, data_dir: str | Path, state_dir: str | Path,
                 pace_s: float = 0.0, fault: str = "") -> None:
        check_fault(fault)
        self.name = name
        self.fault = delta_fault(fault)  # testing: a hostile or broken site (faults.py)
        self._first_sent: dict[str, torch.Tensor] | None = None  # for the replay fault
        self.pace_s = pace_s  # emulated hardware: every inner step takes at least this long
        self.data_dir = Path(data_dir)
        self.state_dir = Path(state_dir)
        self._key: str | None = None  # what the in-memory model/trainer/reader were built for
        self._completed: int | None = None  # round whose end state is in memory
        self.model: torch.nn.Module | None = None
        self.trainer: InnerTrainer | None = None
        self.reader: PackedReader | None = None
        self.feedback = ErrorFeedback()  # what the uplink codec dropped, carried forward
        self.anchor: dict[str, torch.Tensor] = {}  # the global weights as last received
        # trained between rounds: (after round, results, the sources consent allowed then)
        self._ahead: tuple[int, list[TrainResult], set[int] | None] | None = None
        self._allowed: set[int] | None = None  # sources consent lets this round read
        self._yielded_base: dict[int, int] = {}  # reader's rows per source at the last save
        self._key_signer: Signer | None = None
        self._keep_anchor = False  # save the received weights with the state (streaming,
        # delta downlink): the next plan builds on them

    def run(self, plan: RoundPlan, on_step: Callable[[int, float], None] | None = None
            ) -> SiteUpdate:
        """Train from the plan's weights; return the pseudo-gradient and its accounting.

        Plain DiLoCo: replace the model by the global weights, train, send ``anchor - local``
        where the anchor is what was received. Streaming (fragments or overlap): the plan
        carries only the fragment synced last round; the site first trains
        ``overlap_steps`` steps (the time that fragment spent on the wire), then merges it,
        ``local = alpha * local + (1 - alpha) * global``, trains on, and sends the delta of
        this round's fragment against the global value it last received. A site worker does
        the overlap steps for real, in the background while the fragment travels
        (:meth:`train_ahead`); the local engine does them here, as many as configured."""
        ahead, self._ahead = self._ahead, None
        allowed = allowed_sources(self.data_dir, plan.purpose)
        if ahead is not None and (ahead[0] != plan.round - 1 or plan.full or
                                  not _covers(allowed, ahead[2])):
            # unusable background steps (or consent was withdrawn from data they read):
            # back to the saved state
            self._completed = None
            ahead = None
        self._build(plan)
        self._restore(plan)
        if allowed is not None and not allowed:
            raise ValueError(f"site {self.name}: no contribution in {self.data_dir} allows "
                             f"the purpose {plan.purpose!r}")
        self.reader.allow = None if allowed is None else allowed.__contains__
        self._allowed = allowed
        trainer, model = self.trainer, self.model
        if trainer.cfg.reset_state:
            trainer.reset_optimizer()
        trainer.step = plan.step  # the global clock, whatever this site did before
        trainer.total_steps = plan.total_steps
        params = dict(model.named_parameters())
        streaming = plan.fragments > 1 or plan.overlap_steps > 0
        groups = split_fragments({n: p.shape for n, p in params.items()}, plan.fragments)
        full = plan.full or not streaming or not self.anchor
        names = list(params) if full else groups[fragment_of_round(plan.round - 1,
                                                                   plan.fragments)]
        # changes down keep the places of the round they come from (random places)
        received = decode(plan.weights, {n: params[n].shape for n in names},
                          parse_spec(plan.codec_down), round_seed(plan.run_id, plan.changes_from))
        if plan.changes_from:  # delta downlink: the change to the weights received before
            if self._completed != plan.changes_from or not self.anchor:
                raise ValueError(f"site {self.name} holds the weights of round "
                                 f"{self._completed or 'none'}, the plan sends changes "
                                 f"against round {plan.changes_from}; the coordinator sends "
                                 f"them whole next round")
            received = {n: self.anchor[n] + c for n, c in received.items()}
        paced = self._paced(on_step)
        results = []
        if not full and plan.overlap_steps:  # training on while the fragment was in flight
            if ahead is not None:
                results = ahead[1]
                trainer.step = plan.step + sum(r.steps for r in results)
            else:
                results.append(trainer.run(self.reader.next_batch, plan.overlap_steps, 0,
                                           paced))
        alpha = plan.merge_alpha if results else 0.0
        with torch.no_grad():
            for n, w in received.items():
                params[n].mul_(alpha).add_(w, alpha=1 - alpha)
                self.anchor[n] = w
        done = sum(r.steps for r in results)
        results.append(trainer.run(self.reader.next_batch, plan.max_steps - done if
                                   plan.max_steps else 0, plan.time_budget_s, paced))
        result = TrainResult.combine(results)
        sent = groups[plan.fragment] if streaming else list(params)
        with torch.no_grad():
            delta = {n: self.anchor[n] - params[n].detach() for n in sent}
        self._keep_anchor = streaming or plan.keep_weights
        if self.fault:
            delta = corrupt_delta(delta, self.fault, seed=plan.round)
        up, seed = parse_spec(plan.codec_up), round_seed(plan.run_id, plan.round)
        if plan.error_feedback and not up.lossless:
            encoded = self.feedback.encode(delta, up, plan.feedback_decay, seed)
        else:
            encoded = encode(delta, up, seed)
        if self.fault == "replay":
            self._first_sent = self._first_sent or encoded
            encoded = self._first_sent
        read = {s: n - self._yielded_base.get(s, 0) for s, n in self.reader.yielded.items()}
        receipt = build_receipt(run_id=plan.run_id, round_=plan.round, site=self.name,
                              purpose=plan.purpose, rows_by_source=read,
                              sources=self.reader.dataset.sources,
                              seq_len=self.reader.dataset.seq_len, delta=encoded)
        self._save(plan.round, plan.keep_since)
        signer = self._signer()
        return SiteUpdate(
            run_id=plan.run_id, round=plan.round, site=self.name, delta=encoded,
            tokens=result.tokens, steps=result.steps, train_loss=result.loss,
            seconds=result.seconds, compute_seconds=result.compute_seconds, codec=up.spec,
            receipt=receipt, receipt_signature=sign_receipt(receipt, signer), signer=signer.public)

    def _signer(self) -> Signer:
        """This site's own Ed25519 key (made on first use, kept with its state)."""
        if self._key_signer is None:
            self._key_signer = Signer.load_or_create(self.state_dir / "signing.key")
        return self._key_signer

    def train_ahead(self, max_steps: int, stop: threading.Event) -> None:
        """Between rounds, in a site worker: train on (up to ``max_steps`` steps) until the
        next plan arrives and ``stop`` is set. :meth:`run` counts these steps as the round's
        overlap and merges the arriving fragment into a model that has moved on."""
        if self.trainer is None or self._completed is None:
            return
        results = []
        while len(results) < max_steps and not stop.is_set():
            results.append(self.trainer.run(self.reader.next_batch, 1, 0, self._paced(None)))
        self._ahead = (self._completed, results, self._allowed)

    def _paced(self, on_step: Callable[[int, float], None] | None
               ) -> Callable[[int, float], None] | None:
        """``on_step``, plus a sleep that stretches each step to ``pace_s`` seconds."""
        if not self.pace_s:
            return on_step
        last = [time.perf_counter()]

        def step(n: int, loss: float) -> None:
            rest = self.pace_s - (time.perf_counter() - last[0])
            if rest > 0:
                time.sleep(rest)
            last[0] = time.perf_counter()
            if on_step is not None:
                on_step(n, loss)

        return step

    # -- building and state -------------------------------------------------------------

    def _build(self, plan: RoundPlan) -> None:
        key = hashlib.sha256(json.dumps([plan.run_id, plan.model_config, plan.inner,
                                         plan.seq_len, plan.seed, plan.codec_up],
                                        sort_keys=True,
                                        default=str).encode()).hexdigest()
        if key == self._key:
            return
        cfg = AutoConfig.for_model(**plan.model_config)
        self.model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        inner = InnerConfig(**plan.inner)
        self.trainer = InnerTrainer(self.model, inner, plan.total_steps)
        dataset = TokenDataset(self.data_dir, "train", plan.seq_len)
        if dataset.manifest["vocab_size"] > cfg.vocab_size:
            raise ValueError(f"site {self.name}: data in {self.data_dir} was prepared with a "
                             f"vocabulary of {dataset.manifest['vocab_size']}, the model has "
                             f"{cfg.vocab_size}")
        self.reader = PackedReader(dataset, inner.batch_size, seed=data_seed(plan.seed, self.name))
        self.feedback = ErrorFeedback()
        self.anchor = {}
        self._yielded_base = {}
        self._key, self._completed = key, None

    def saved_rounds(self) -> list[int]:
        if not self.state_dir.exists():
            return []
        return sorted(int(m.group(1)) for p in self.state_dir.iterdir()
                      if (m := _ROUND_DIR.match(p.name)))

    def _restore(self, plan: RoundPlan) -> None:
        """Bring the in-memory state to the newest round saved before the plan's round."""
        before = [r for r in self.saved_rounds() if r < plan.round]
        if not before:
            if self._completed is not None:  # memory holds a later round: start afresh
                self._key = None
                self._build(plan)
            return
        latest = before[-1]
        if latest == self._completed:
            return
        state = load_state(self.state_dir / f"round-{latest:05d}")
        if state["key"] != self._key:  # saved by a different run or setup: start afresh
            if self._completed is not None:
                self._key = None
                self._build(plan)
            return
        self.trainer.load_state_dict(state["trainer"])
        self.reader.load_state_dict(state["reader"])
        self._yielded_base = dict(self.reader.yielded)
        self.feedback.residual = dict(state.get("residual", {}))
        if state.get("local"):  # streaming: the model is not replaced whole every round
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, w in state["local"].items():
                    params[n].copy_(w)
            self.anchor = dict(state["anchor"])
        self._completed = latest

    def _save(self, round_: int, keep_since: int = 0) -> None:
        state = {"key": self._key, "round": round_, "trainer": self.trainer.state_dict(),
                 "reader": self.reader.state_dict(), "residual": self.feedback.residual,
                 "saved_at": time.time()}
        if self._keep_anchor:
            state["local"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            state["anchor"] = dict(self.anchor)
        save_state(state, self.state_dir / f"round-{round_:05d}")
        self._yielded_base = dict(self.reader.yielded)
        self._completed = round_
        saved = self.saved_rounds()
        # a repeat of round keep_since + 1 starts from the newest state up to keep_since
        floor = max([r for r in saved if r <= keep_since], default=0)
        for old in [r for r in saved[:-KEEP_STATES] if r < floor]:
            shutil.rmtree(self.state_dir / f"round-{old:05d}", ignore_errors=True)


def _covers(now: set[int] | None, then: set[int] | None) -> bool:
    """Whether consent now still covers every source that was allowed ``then``."""
    return now is None or (then is not None and then <= now)
