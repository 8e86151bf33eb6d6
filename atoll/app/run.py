"""A run folder and the loop that fills it, whatever engine moves the messages.

``Run`` owns what a person reads afterwards: the resolved ``config.toml``, ``metrics.jsonl``,
``checkpoints/``, ``model/`` and (via :mod:`atoll.app.html_report`) ``report.html``. Its
:meth:`Run.execute` is where a run's rounds start: after each one it writes the books,
evaluates the global model per domain, brings the centralised baselines level with the
federation's tokens, and checkpoints so that ``--resume`` continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from atoll.app.books import Books
from atoll.app.evaluation import eval_sets, evaluate
from atoll.app.grid_run import build_coordinator
from atoll.app.metrics import FEDERATION, MetricsLog, final_losses, mean_loss, read_metrics
from atoll.app.model_card import write_model_card
from atoll.app.progress import Progress
from atoll.app.run_config import RunConfig, coordinator_config
from atoll.app.run_folder import RunFolder
from atoll.app.status import StatusBoard
from atoll.app.step_clock import RoundClock
from atoll.app.trackers import Trackers
from atoll.capacity.wire import data_parallel_bytes
from atoll.config import save as save_config
from atoll.config import to_dict
from atoll.federation.engine import Engine
from atoll.federation.evaluation import EvalOutcome, ask_sites, eval_requests
from atoll.federation.rounds import RoundResult, run_round
from atoll.ledger.credit import ValidationGradient
from atoll.model import count_parameters, export
from atoll.tokenizer import load_tokenizer
from atoll.train.baselines import CentralisedBaseline
from atoll.util.weights import load_weights


class Run:
    """One federated run (plus its baselines) writing into ``out``."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, resume: bool = False,
                 progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress or Progress(quiet=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.folder = RunFolder(self.out, log=self.progress.log)  # locked before any write
        self.run_id = self.folder.identity(cfg.name, resume)
        if not resume:
            save_config(cfg, self.out / "config.toml")
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.model = cfg.model.build(self.tokenizer, seed=cfg.seed)
        init = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.coordinator, self.grid = build_coordinator(  # a grid of paths, or dense
            init, coordinator_config(cfg, self.run_id, self.model.config.to_dict()),
            cfg.model.paths, self.out, self.model, self.progress.log)
        self.eval_sets = eval_sets(cfg)
        self.books = self._open_books()
        self.baselines = [self._baseline(kind, init) for kind in cfg.baseline.kinds]
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self._engine: Engine | None = None  # set by execute(): the sites evaluate through it
        self.bytes_up = self.bytes_down = 0
        self._clock = RoundClock(cfg.federation.rounds)
        if resume:
            self._resume()
        self.trackers = Trackers(cfg.report_to, self.out, self.run_id, to_dict(cfg),
                                 self.coordinator.round + 1 if resume else 0, self.progress.log)
        self.metrics.listeners.append(self.trackers.send)
        last = [r for r in read_metrics(self.out / "metrics.jsonl")
                if r["kind"] == "round" and r["run"] == FEDERATION and r["round"] > 0]
        self.status = StatusBoard(self.out, cfg.federation.rounds, self.coordinator.round,
                                  last[-1] if last else None, cfg.federation.steps_per_round,
                                  listener=self.progress.status)

    def _open_books(self) -> Books:
        """The contribution ledger, valuing updates against the run's validation sets."""
        def probe_batches() -> list[torch.Tensor]:  # the sets as of the round (consent)
            return [b for batches in self.eval_sets.values()
                    for b in batches[: self.cfg.credit.batches]]
        probe = ValidationGradient(self.model, probe_batches) if self.grid is None else \
            (lambda weights: self.grid.gradient(weights, probe_batches()))
        books = Books(
            self.out, self.run_id, self.cfg.purpose,
            lambda: (self.coordinator.round + 1, self.coordinator.weights),
            probe if probe_batches() else None, self.cfg.federation.staleness_exponent)
        self.coordinator.audit, self.coordinator.ledger_head = books.audit, books.ledger.head
        books.start(self.cfg.name, hashlib.sha256(
            (self.out / "config.toml").read_bytes()).hexdigest())
        return books

    def _baseline(self, kind: str, init: dict[str, torch.Tensor]) -> CentralisedBaseline:
        model = self.cfg.model.build(self.tokenizer, seed=self.cfg.seed)
        load_weights(model, init)
        return CentralisedBaseline(kind, model, self.cfg.inner, [s.data for s in self.cfg.sites],
                                   self.cfg.data.seq_len, self.cfg.seed, self.cfg.total_steps,
                                   purpose=self.cfg.purpose, device=self.cfg.device)

    # -- the loop --------------------------------------------------------------------------

    def execute(self, engine: Engine) -> None:
        """Run rounds until ``federation.rounds`` are done."""
        rounds = self.cfg.federation.rounds
        self._engine = engine
        if self.coordinator.round == 0:
            self._know_sites(engine)  # a grid's router first: round 0 is evaluated with it
            self._after_round(0, None, 0.0)
        while self.coordinator.round < rounds:
            start = time.perf_counter()
            self._know_sites(engine)
            result = run_round(self.coordinator, engine, self.status.round_started,
                               self.status.reported)
            self._record_replies(result)
            self._after_round(result.outcome.round, result, time.perf_counter() - start)
            r = result.outcome.round
            if r % self.cfg.checkpoint.every == 0 or r == rounds:
                self.checkpoint()

    def _know_sites(self, engine: Engine) -> None:
        """A grid: the features of each site not seen before (the router is fitted on the
        first ones)."""
        if self.grid is not None:
            self.grid.know_sites(engine, engine.available_sites(),
                                 self.cfg.federation.deadline_s)

    def _record_replies(self, result: RoundResult) -> None:
        """The ledger's entries for the round, and a metrics record per site."""
        out = result.outcome
        r = out.round
        self.books.close_round(out, self.coordinator.weights)
        for u in result.replies:
            self.metrics.write({
                "kind": "site", "run": FEDERATION, "round": r, "site": u.site,
                "train_loss": u.train_loss, "tokens": u.tokens, "steps": u.steps,
                "seconds": u.seconds, "compute_seconds": u.compute_seconds,
                "bytes_up": u.bytes_up, "bytes_down": u.bytes_down,
                "accepted": u.site in out.accepted, "reason": out.rejected.get(u.site),
                "norm": out.norms.get(u.site)})
            self.bytes_up += u.bytes_up
            self.bytes_down += u.bytes_down
        for f in result.failures:
            self.metrics.write({"kind": "site", "run": FEDERATION, "round": r, "site": f.site,
                                "accepted": False, "reason": f.reason})
        for site, reason in out.rejected.items():
            self.progress.log(f"  round {r}: update of {site} rejected: {reason}")

    def _after_round(self, r: int, result: RoundResult | None, seconds: float) -> None:
        """Evaluate and log the federation after round ``r``, then the baselines."""
        self.eval_sets = eval_sets(self.cfg)  # consent re-read: a revocation counts from now
        due = r == 0 or r % self.cfg.eval.every == 0 or r == self.cfg.federation.rounds
        line = self._log_federation(r, result, seconds, due)
        line += self._advance_baselines(r, due)
        line += f"  tokens {self.coordinator.tokens / 1e6:.2f}M  {seconds:.1f}s"
        self.progress.log(line + self._clock.eta(r))

    def _log_federation(self, r: int, result: RoundResult | None, seconds: float,
                        due: bool) -> str:
        """Write the federation's round record; the start of the round's console line."""
        fed_val, asked = self._federation_val(r) if due else (None, None)
        out = result.outcome if result else None
        record = {
            "kind": "round", "run": FEDERATION, "round": r, "tokens": self.coordinator.tokens,
            "step": self.coordinator.step, "train_loss": out.train_loss if out else None,
            "val_loss": fed_val, "sites": out.accepted if out else [],
            "rejected": out.rejected if out else {}, "late": out.late if out else [],
            "rejected_count": len(out.rejected) if out else 0,
            "epsilon": out.epsilon if out else None,
            "delta": self.cfg.privacy.delta if out and out.epsilon is not None else None,
            "bytes_up": sum(u.bytes_up for u in result.replies) if result else 0,
            "bytes_down": sum(u.bytes_down for u in result.replies) if result else 0,
            # an fp32 all-reduce among the round's sites after every step: the yardstick of
            # the federation's bytes in the summary and the report (one path of a grid)
            "dp_bytes": data_parallel_bytes(count_parameters(self.model), len(out.planned),
                                            out.steps) if out else 0.0,
            "seconds": seconds, "ended": time.time()}
        if asked is not None:  # evaluated by the sites
            record.update(val_tokens=asked.tokens, eval_refused=asked.refused,
                          eval_bytes=asked.bytes_up + asked.bytes_down)
        self.metrics.write(record)
        if r > 0:
            self.status.round_closed(record)
        line = f"round {r}/{self.cfg.federation.rounds}"
        if out:
            train = out.train_loss if out.train_loss is not None else float("nan")
            line += f"  sites {len(out.accepted)}/{len(out.planned)}  train {train:.3f}"
        if fed_val:
            line += f"  val {mean_loss(fed_val):.3f}"
        return line

    def _advance_baselines(self, r: int, due: bool) -> str:
        """Train each baseline up to the federation's tokens and log it; its console part."""
        line = ""
        for b in self.baselines:
            result = b.train_to(self.coordinator.tokens)
            b_val = evaluate(b.model, self.eval_sets) if due else None
            self.metrics.write({
                "kind": "round", "run": b.name, "round": r, "tokens": b.tokens,
                "step": b.trainer.step, "train_loss": result.loss if result else None,
                "val_loss": b_val, "seconds": result.seconds if result else 0.0})
            if b_val:
                line += f"  {b.kind} {mean_loss(b_val):.3f}"
        return line

    def _federation_val(self, r: int) -> tuple[dict[str, float], EvalOutcome | None]:
        """The global weights' loss per domain after round ``r``: reported by the sites
        (``eval.at = "sites"``; plus the coordinator's own ``eval.sets``, if any), or
        measured here."""
        e = self.cfg.eval
        if e.at == "coordinator":
            return self.evaluate(self.coordinator.weights), None
        weights, sites = self.coordinator.weights, self._engine.available_sites()
        asked = self.grid.ask_sites(self._engine, r, sites, self.cfg) if self.grid else \
            ask_sites(self._engine, eval_requests(
                self.run_id, r, sites, weights, self.model.config.to_dict(),
                self.cfg.data.seq_len, self.cfg.purpose, e.batch_size, e.max_batches),
                self.cfg.federation.deadline_s)
        for site, reason in asked.refused.items():
            self.progress.log(f"  round {r}: evaluation at {site} not counted: {reason}")
        val = dict(asked.losses)
        if e.sets:
            val.update(self.evaluate(weights))
        return val, asked

    def evaluate(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Validation loss per domain of ``weights`` (loaded into the run's model; a grid's
        path by path, each row on its own)."""
        if self.grid is not None:
            return self.grid.evaluate(weights, self.eval_sets)
        load_weights(self.model, weights)
        return evaluate(self.model, self.eval_sets)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self) -> Path:
        """Save coordinator + baselines for the last closed round."""
        r = self.coordinator.round
        parts = {"coordinator": {**self.coordinator.state_dict(), "bytes_up": self.bytes_up,
                                 "bytes_down": self.bytes_down}}
        parts |= {f"baseline-{b.kind}": b.state_dict() for b in self.baselines}
        path = self.folder.save_checkpoint(r, parts, self.cfg.checkpoint.keep)
        self.coordinator.checkpointed = floor = (self.checkpoints() or [0])[0]
        if self._engine is not None:  # no restart needs them, nor a late update
            self._engine.release(min(floor + 1, r + 1 - self.cfg.federation.max_staleness))
        return path

    def checkpoints(self) -> list[int]:
        """The rounds that have a checkpoint, oldest first. A restart may go back to the
        first (a damaged newest checkpoint is passed over for an older one), so sites keep
        the state to repeat rounds from there."""
        return self.folder.checkpoints.rounds()

    def _resume(self) -> None:
        parts = self.folder.load_checkpoint(
            ["coordinator", *(f"baseline-{b.kind}" for b in self.baselines)])
        if parts is None:
            self.metrics.truncate_after(-1)  # nothing to keep: start from round 0 again
            self.books.resumed_at(0)
            return
        state = parts["coordinator"]
        self.coordinator.load_state_dict(state)
        self.coordinator.checkpointed = min((self.checkpoints() or [0])[0], self.coordinator.round)
        self.bytes_up, self.bytes_down = state["bytes_up"], state["bytes_down"]
        for b in self.baselines:
            b.load_state_dict(parts[f"baseline-{b.kind}"])
        self.metrics.truncate_after(self.coordinator.round)
        change, r = self.coordinator.budget.change, self.coordinator.round
        self.books.resumed_at(r, change)
        if change:  # in the ledger (above), the metrics and so the report
            self.metrics.write({"kind": "privacy", "run": FEDERATION, "round": r, **change})
            self.progress.log(f"privacy settings changed on resume at round {r}: {change}")
        self.progress.log(f"resumed {self.out} at round {self.coordinator.round}")

    # -- the end -----------------------------------------------------------------------------

    def finish(self) -> Path:
        """Export the global model in Hugging Face format to ``out/model`` (a grid: every
        path, and the router)."""
        if self.grid is not None:
            path = self.grid.export(self.coordinator.weights, self.tokenizer, self.out / "model")
        else:
            load_weights(self.model, self.coordinator.weights)
            path = export(self.model, self.tokenizer, self.out / "model")
            write_model_card(self.out, path)
        self.status.finished()
        return path

    def close(self) -> None:
        """Release the run folder (another process may then resume it)."""
        self.trackers.close()
        self.books.close()
        self.folder.release()

    def final_losses(self) -> dict[str, dict[str, float]]:
        """Last validation losses per run (federation, baselines) from the metrics."""
        return final_losses(read_metrics(self.out / "metrics.jsonl"))

