"""A site: private data plus local compute. Takes a RoundPlan, trains, returns a SiteUpdate.

A site needs only its data directory and a directory for its own state
(:mod:`atoll.federation.site_state`). Everything else (the model, the training settings,
the schedule position) arrives with the plans, so a site can join a running federation at
any round. One round is a pipeline of five stages (:meth:`Site.run`):

1. **receive**: load the state saved before this round, apply consent, decode the plan's
   weights (whole, one fragment, or their change since the weights this site holds);
2. **train**: H AdamW steps (or a time budget); with streaming, the steps trained while the
   fragment was on the wire come first and the fragment is merged into the moved model;
3. **pseudo-gradient**: ``theta - theta_site`` for the tensors synced this round;
4. **encode** it with the uplink codec, carrying what it drops to the next round;
5. **sign**: save the round's state, and sign a receipt of what was read.

The site trains on its own ``device`` (:mod:`atoll.train.device`); weights cross to it once
a round (the received ones in) and back once (the trained ones out, to form the
pseudo-gradient on the host in fp32), so what is encoded and sent never depends on it.

A site may be several processes (``parallel``, :mod:`atoll.train.distributed`): each runs
this same Site on the plan rank 0 received, trains its share of every global batch and saves
its own state; the trained tensors stream to rank 0 one at a time, and only rank 0 encodes,
signs and answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atoll.consent.pool import allowed_sources
from atoll.federation.codecs import decode, encode, parse_spec, round_seed
from atoll.federation.evaluation import SiteEvaluator
from atoll.federation.features import FeatureRequest, answer_features
from atoll.federation.protocol import (
    EvalRequest,
    RoundPlan,
    RunSpec,
    SiteUpdate,
    from_parts,
    header,
    tensor_bytes,
)
from atoll.federation.site_paths import PathStates
from atoll.federation.site_state import SiteState, data_seed
from atoll.ledger.heads import remember_head
from atoll.ledger.receipts import bind_signer, build_receipt, sign_receipt
from atoll.ledger.signing import Signer
from atoll.train.device import resolve_device, to_host
from atoll.train.distributed import Parallel, local_device
from atoll.train.inner import TrainResult, paced
from atoll.util.errors import WireError

__all__ = ["Site", "data_seed"]

StepCallback = Callable[[int, float], None]


class Site:
    """One member of a federation, with data that never leaves it."""

    def __init__(self, name: str, data_dir: str | Path, state_dir: str | Path,
                 pace_s: float = 0.0, device: str = "cpu", parallel: Parallel | None = None
                 ) -> None:
        self.name = name
        self.parallel = parallel or Parallel()  # this process among the site's processes
        self.pace_s = pace_s  # emulated hardware: every inner step takes at least this long
        self.data_dir = Path(data_dir)
        self.state_dir = Path(state_dir)
        # this machine's (auto, cpu, cuda, cuda:N); with several processes, one GPU each
        self.device = local_device(resolve_device(device))
        self.home = SiteState(name, self.data_dir, self.parallel.state_dir(self.state_dir),
                              self.device, self.parallel)
        self.state = self.home  # what trains this round: home, or a path's (grid of paths)
        self.paths = PathStates(name, self.data_dir, self.state_dir, self.device,
                                self.parallel)
        # trained between rounds: (after round, results, the sources consent allowed then)
        self._ahead: tuple[int, list[TrainResult], set[int] | None] | None = None
        self._allowed: set[int] | None = None  # sources consent lets this round read
        self._signer: Signer | None = None
        self.node_key: Path | None = None  # its node's private key: vouches for receipts
        self.evaluator = SiteEvaluator(name, self.data_dir, self.device)

    # what tests and the site worker look at
    model = property(lambda self: self.state.model)
    trainer = property(lambda self: self.state.trainer)
    reader = property(lambda self: self.state.reader)
    anchor = property(lambda self: self.state.anchor)
    feedback = property(lambda self: self.state.feedback)

    @property
    def overlap_steps(self) -> int:
        """Steps to train ahead between rounds (streaming with overlap), per the run spec;
        none for a site of several processes (they train the overlap on receipt, together)."""
        if self.parallel.world > 1:
            return 0
        return self.home.spec.overlap_steps if self.home.spec else 0

    def answer(self, head: dict[str, Any], blob: bytes,
               on_step: StepCallback | None = None) -> tuple[dict[str, Any], bytes]:
        """A plan in its wire form (header, tensor bytes) in, the update's out (on rank 0;
        every process of a site is given the same plan, the others get ``({}, b"")``).
        An evaluation request is answered with its report (:mod:`atoll.federation.evaluation`)."""
        if head.get("type") == EvalRequest.__name__:
            return self.evaluator.answer(from_parts(head, blob, EvalRequest))
        if head.get("type") == FeatureRequest.__name__:
            return answer_features(self.name, self.data_dir,
                                   from_parts(head, blob, FeatureRequest))
        plan = from_parts(head, blob, RoundPlan)
        if plan.site != self.name:
            raise WireError(f"plan addressed to site {plan.site!r} reached site {self.name!r}")
        update = self.run(plan, on_step)
        if update is None:
            return {}, b""
        return header(update), tensor_bytes(update.delta)

    def run(self, plan: RoundPlan, on_step: StepCallback | None = None) -> SiteUpdate | None:
        """One round: receive -> train -> pseudo-gradient -> encode -> sign (``None`` on the
        processes of a site other than rank 0: they only save their state)."""
        spec = self.home.spec_for(plan)
        self.state = self.paths.for_plan(plan, spec) if plan.path else self.home
        remember_head(self.state_dir, plan.run_id, plan.round, plan.ledger_head)
        ahead = self._usable_ahead(plan, spec)
        received = self.receive(plan, spec)
        result = self.train(plan, spec, received, ahead, paced(on_step, self.pace_s))
        delta = self.pseudo_gradient(plan, spec)
        if not self.parallel.is_main:
            self.save(plan, spec)
            return None
        encoded = self.encode(plan, spec, delta)
        return self.sign(plan, spec, result, encoded)

    # -- 1. receive ------------------------------------------------------------------------

    def _usable_ahead(self, plan: RoundPlan, spec: RunSpec) -> list[TrainResult] | None:
        """The steps trained ahead since last round, if this round may count them."""
        ahead, self._ahead = self._ahead, None
        self._allowed = allowed_sources(self.data_dir, spec.purpose)
        if ahead is not None and (ahead[0] != plan.round - 1 or plan.full or
                                  not _covers(self._allowed, ahead[2])):
            # unusable background steps (or consent was withdrawn from data they read):
            # back to the saved state
            self.state.forget_round()
            return None
        return None if ahead is None else ahead[1]

    def receive(self, plan: RoundPlan, spec: RunSpec) -> dict[str, torch.Tensor]:
        """Load the state this round starts from and decode the weights the plan carries."""
        st = self.state
        st.build(spec)
        st.restore(spec, plan.round)
        self.parallel.agree(st.completed, f"site {self.name}: the round whose saved state "
                            f"each process starts from")
        allowed = self._allowed
        if allowed is not None and not allowed:
            raise ValueError(f"site {self.name}: no contribution in {self.data_dir} allows "
                             f"the purpose {spec.purpose!r}")
        st.reader.allow = None if allowed is None else allowed.__contains__
        if st.trainer.cfg.reset_state:
            st.trainer.reset_optimizer()
        st.trainer.step = plan.step  # the global clock, whatever this site did before
        st.trainer.total_steps = spec.total_steps
        names = list(st.shapes) if self._whole(plan, spec) else st.fragment(plan.round - 1)
        # changes down keep the places of the round they come from (random places)
        received = decode(plan.weights, {n: st.shapes[n] for n in names},
                          parse_spec(plan.codec), round_seed(plan.run_id, plan.base))
        if plan.base:  # delta downlink: the change to the weights received before
            if st.completed != plan.base or not st.anchor:
                raise ValueError(f"site {self.name} holds the weights of round "
                                 f"{st.completed or 'none'}, the plan sends changes "
                                 f"against round {plan.base}; the coordinator sends "
                                 f"them whole next round")
            received = {n: st.anchor[n] + c for n, c in received.items()}
        return received

    def _whole(self, plan: RoundPlan, spec: RunSpec) -> bool:
        """Whether the plan's weights replace the whole model (else: one fragment)."""
        return plan.full or not spec.streaming or not self.state.anchor

    # -- 2. train --------------------------------------------------------------------------

    def train(self, plan: RoundPlan, spec: RunSpec, received: dict[str, torch.Tensor],
              ahead: list[TrainResult] | None, on_step: StepCallback | None) -> TrainResult:
        """Merge the received weights and train for the round (Streaming DiLoCo: the steps
        the fragment spent on the wire come first, and it is merged into the moved model)."""
        st = self.state
        results: list[TrainResult] = []
        if not self._whole(plan, spec) and spec.overlap_steps:
            if ahead is not None:  # a site worker trained them for real meanwhile
                results = ahead
                st.trainer.step = plan.step + sum(r.steps for r in results)
            else:
                results.append(st.trainer.run(st.next_batch, spec.overlap_steps, 0,
                                              on_step, self.parallel.any_rank))
        alpha = spec.merge_alpha if results else 0.0
        self.parallel.load(st.model, received, alpha)  # local = a*local + (1-a)*w
        st.anchor.update(received)  # kept on the host for the pseudo-gradient
        done = sum(r.steps for r in results)
        results.append(st.trainer.run(st.next_batch, plan.steps - done if plan.steps
                                      else 0, plan.time_budget_s, on_step,
                                      self.parallel.any_rank))
        result = TrainResult.combine(results)
        result.tokens *= self.parallel.world  # each process counted its share of the batches
        result.loss = self.parallel.mean(result.loss)  # and measured the loss on it
        return result

    # -- 3. pseudo-gradient ----------------------------------------------------------------

    def pseudo_gradient(self, plan: RoundPlan, spec: RunSpec) -> dict[str, torch.Tensor]:
        """``theta - theta_site`` for the tensors this round syncs (one fragment if streaming)."""
        st = self.state
        params = dict(st.model.named_parameters())
        sent = st.fragment(plan.round) if spec.streaming else list(params)
        if self.parallel.world > 1:  # gathered from the processes one tensor at a time
            return {n: st.anchor[n] - t for n, t in self.parallel.full_tensors(st.model, sent)
                    if t is not None}
        trained = to_host({n: params[n] for n in sent})  # fp32 on the host, whatever device
        with torch.no_grad():
            return {n: st.anchor[n] - trained[n] for n in sent}

    # -- 4. encode -------------------------------------------------------------------------

    def encode(self, plan: RoundPlan, spec: RunSpec, delta: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
        """The pseudo-gradient in the uplink codec, with error feedback when it is lossy."""
        up, seed = parse_spec(spec.codec_up), round_seed(plan.run_id, plan.round)
        if spec.error_feedback and not up.lossless:
            return self.state.feedback.encode(delta, up, spec.feedback_decay, seed)
        return encode(delta, up, seed)

    # -- 5. sign ---------------------------------------------------------------------------

    def sign(self, plan: RoundPlan, spec: RunSpec, result: TrainResult,
             encoded: dict[str, torch.Tensor]) -> SiteUpdate:
        """Save the round's state and return the update with a signed receipt of what it
        read (contribution ids, hashes and tokens; never text)."""
        st = self.state
        dataset = st.reader.dataset
        receipt = build_receipt(run_id=plan.run_id, round_=plan.round, site=self.name,
                                purpose=spec.purpose, rows_by_source=st.rows_read(),
                                sources=dataset.sources, seq_len=dataset.seq_len, delta=encoded)
        self.save(plan, spec)
        signer = self.signer()
        return SiteUpdate(
            run_id=plan.run_id, round=plan.round, site=self.name, delta=encoded,
            tokens=result.tokens, steps=result.steps, train_loss=result.loss,
            seconds=result.seconds, compute_seconds=result.compute_seconds,
            codec=parse_spec(spec.codec_up).spec, receipt=receipt,
            receipt_signature=sign_receipt(receipt, signer), signer=signer.public,
            signer_binding=bind_signer(self.node_key, signer.public) if self.node_key else "")

    def save(self, plan: RoundPlan, spec: RunSpec) -> None:
        """Save this process's state at the end of ``plan``'s round."""
        self.state.keep_anchor = spec.streaming or spec.keep_weights
        self.state.save(plan.round, plan.keep_since)

    def signer(self) -> Signer:
        """This site's own Ed25519 key (made on first use, kept with its state)."""
        if self._signer is None:
            self._signer = Signer.load_or_create(self.state_dir / "signing.key")
        return self._signer

    # -- between rounds --------------------------------------------------------------------

    def train_ahead(self, max_steps: int, stop: threading.Event) -> None:
        """Between rounds, in a site worker: train on (up to ``max_steps`` steps) until the
        next plan arrives and ``stop`` is set. :meth:`run` counts these steps as the round's
        overlap and merges the arriving fragment into a model that has moved on."""
        st = self.state
        if st.trainer is None or st.completed is None:
            return
        results = []
        while len(results) < max_steps and not stop.is_set():
            results.append(st.trainer.run(st.next_batch, 1, 0, paced(None, self.pace_s)))
        self._ahead = (st.completed, results, self._allowed)

    def saved_rounds(self) -> list[int]:
        """The rounds whose end state this site has saved."""
        return self.state.folders.rounds()


def _covers(now: set[int] | None, then: set[int] | None) -> bool:
    """Whether consent now still covers every source that was allowed ``then``."""
    return now is None or (then is not None and then <= now)
