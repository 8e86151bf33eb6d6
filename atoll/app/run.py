"""A run folder and the loop that fills it, whatever engine moves the messages.

``Run`` owns what a person reads afterwards: the resolved ``config.toml``, ``metrics.jsonl``,
``checkpoints/``, ``model/`` and (via :mod:`atoll.app.html_report`) ``report.html``. It
global model per domain, keeps the centralised baselines level with the federation, and
checkpoints after every round so that ``--resume`` continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import uuid
from pathlib import Path

import torch

from atoll.app.books import Books
from atoll.app.metrics import FEDERATION, MetricsLog, read_metrics
from atoll.app.progress import Progress
from atoll.app.run_config import EvalConfig, RunConfig
from atoll.app.status import StatusBoard
from atoll.config import save as save_config
from atoll.consent.pool import consent_filter
from atoll.data.reader import TokenDataset, validation_batches
from atoll.federation.coordinator import Coordinator
from atoll.federation.protocol import Engine
from atoll.federation.rounds import RoundResult, run_round
from atoll.ledger.credit import ValidationGradient
from atoll.model import export
from atoll.tokenizer import load_tokenizer
from atoll.train.baselines import CentralisedBaseline
from atoll.train.evaluate import validation_loss
from atoll.util.atomic import write_atomic
from atoll.util.storage import load_state, save_state

_CKPT = re.compile(r"^round-(\d{5,})$")


class Run:
    """One federated run (plus its baselines) writing into ``out``."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, resume: bool = False,
                 progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress or Progress(quiet=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_run_folder(self.out)
        self.run_id = self._identity(resume)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.model = cfg.model.build(self.tokenizer, seed=cfg.seed)
        init = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.coordinator = Coordinator(
            init, run_id=self.run_id, seed=cfg.seed, federation=cfg.federation,
            outer=cfg.outer, inner=cfg.inner, model_config=self.model.config.to_dict(),
            seq_len=cfg.data.seq_len, total_steps=cfg.total_steps, up=cfg.comm.up,
            down=cfg.comm.down, purpose=cfg.purpose, checks=cfg.checks,
            aggregation=cfg.aggregation, privacy=cfg.privacy)
        self.eval_sets = self._eval_sets()
        probe_batches = [b for batches in self.eval_sets.values()
                         for b in batches[: cfg.credit.batches]]
        self.books = Books(
            self.out, self.run_id, cfg.purpose,
            lambda: (self.coordinator.round + 1, self.coordinator.weights),
            ValidationGradient(self.model, probe_batches) if probe_batches else None,
            cfg.federation.staleness_exponent)
        self.coordinator.audit = self.books.audit
        self.books.start(cfg.name, hashlib.sha256(
            (self.out / "config.toml").read_bytes()).hexdigest())
        self.baselines = [self._baseline(kind, init) for kind in cfg.baseline.kinds]
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.bytes_up = self.bytes_down = 0
        if resume:
            self._resume()
        last = [r for r in read_metrics(self.out / "metrics.jsonl")
                if r["kind"] == "round" and r["run"] == FEDERATION and r["round"] > 0]
        self.status = StatusBoard(self.out, cfg.federation.rounds, self.coordinator.round,
                                  last[-1] if last else None)

    # -- set-up ---------------------------------------------------------------------------

    def _identity(self, resume: bool) -> str:
        path = self.out / "run.json"
        if resume:
            if not path.exists():
                raise FileNotFoundError(f"{self.out} is not a run folder (no run.json)")
            return json.loads(path.read_text())["run_id"]
        if path.exists():
            raise FileExistsError(f"{self.out} already holds a run: use --resume, or another --out")
        run_id = uuid.uuid4().hex[:12]
        write_atomic(path, json.dumps({"run_id": run_id, "name": self.cfg.name,
                                       "started": time.time()}).encode())
        save_config(self.cfg, self.out / "config.toml")
        return run_id

    def _eval_sets(self) -> dict[str, list[torch.Tensor]]:
        e = self.cfg.eval
        sets = [(s.name, s.data) for s in e.sets] or [
            (s.name, s.data) for s in self.cfg.sites if s.data and Path(s.data).is_dir()]
        out = {}
        for name, data in sets:
            batches = held_out_batches(data, self.cfg.data.seq_len, e, self.cfg.purpose)
            if batches:
                out[name] = batches
        return out

    def _baseline(self, kind: str, init: dict[str, torch.Tensor]) -> CentralisedBaseline:
        model = self.cfg.model.build(self.tokenizer, seed=self.cfg.seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(init[n])
        return CentralisedBaseline(kind, model, self.cfg.inner, [s.data for s in self.cfg.sites],
                                   self.cfg.data.seq_len, self.cfg.seed, self.cfg.total_steps,
                                   purpose=self.cfg.purpose)

    # -- the loop --------------------------------------------------------------------------

    def execute(self, engine: Engine) -> None:
        """Run rounds until ``federation.rounds`` are done."""
        rounds = self.cfg.federation.rounds
        if self.coordinator.round == 0:
            self._evaluate_and_log(0, None, 0.0)
        while self.coordinator.round < rounds:
            start = time.perf_counter()
            report = run_round(self.coordinator, engine, self.status.round_started,
                               self.status.reported)
            self._record(report, time.perf_counter() - start)

    def _record(self, report: RoundResult, seconds: float) -> None:
        out = report.outcome
        r = out.round
        self.books.close_round(out, self.coordinator.weights)
        for u in report.replies:
            self.metrics.write({
                "kind": "site", "run": FEDERATION, "round": r, "site": u.site,
                "train_loss": u.train_loss, "tokens": u.tokens, "steps": u.steps,
                "seconds": u.seconds, "compute_seconds": u.compute_seconds,
                "bytes_up": u.bytes_up, "bytes_down": u.bytes_down,
                "accepted": u.site in out.accepted, "reason": out.rejected.get(u.site),
                "norm": out.norms.get(u.site)})
            self.bytes_up += u.bytes_up
            self.bytes_down += u.bytes_down
        for f in report.failures:
            self.metrics.write({"kind": "site", "run": FEDERATION, "round": r, "site": f.site,
                                "accepted": False, "reason": f.reason})
        for site, reason in out.rejected.items():
            self.progress.log(f"  round {r}: update of {site} rejected: {reason}")
        self._evaluate_and_log(r, report, seconds)
        if r % self.cfg.checkpoint.every == 0 or r == self.cfg.federation.rounds:
            self.checkpoint()

    def _evaluate_and_log(self, r: int, report: RoundResult | None, seconds: float) -> None:
        due = r == 0 or r % self.cfg.eval.every == 0 or r == self.cfg.federation.rounds
        fed_val = self.evaluate(self.coordinator.weights) if due else None
        out = report.outcome if report else None
        record = {
            "kind": "round", "run": FEDERATION, "round": r, "tokens": self.coordinator.tokens,
            "step": self.coordinator.step, "train_loss": out.train_loss if out else None,
            "val_loss": fed_val, "sites": out.accepted if out else [],
            "rejected": out.rejected if out else {}, "late": out.late if out else [],
            "rejected_count": len(out.rejected) if out else 0,
            "epsilon": out.epsilon if out else None,
            "delta": self.cfg.privacy.delta if out and out.epsilon is not None else None,
            "bytes_up": sum(u.bytes_up for u in report.replies) if report else 0,
            "bytes_down": sum(u.bytes_down for u in report.replies) if report else 0,
            "seconds": seconds, "ended": time.time()}
        self.metrics.write(record)
        if r > 0:
            self.status.round_closed(record)
        line = f"round {r}/{self.cfg.federation.rounds}"
        if out:
            train = out.train_loss if out.train_loss is not None else float("nan")
            line += f"  sites {len(out.accepted)}/{len(out.planned)}  train {train:.3f}"
        if fed_val:
            line += f"  val {_mean(fed_val):.3f}"
        for b in self.baselines:
            result = b.train_to(self.coordinator.tokens)
            b_val = self._evaluate_model(b.model) if due else None
            self.metrics.write({
                "kind": "round", "run": b.name, "round": r, "tokens": b.tokens,
                "step": b.trainer.step, "train_loss": result.loss if result else None,
                "val_loss": b_val, "seconds": result.seconds if result else 0.0})
            if b_val:
                line += f"  {b.kind} {_mean(b_val):.3f}"
        line += f"  tokens {self.coordinator.tokens / 1e6:.2f}M  {seconds:.1f}s"
        self.progress.log(line)

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Validation loss per domain of ``weights`` (loaded into the run's model)."""
        self.load_weights(weights)
        return self._evaluate_model(self.model)

    def _evaluate_model(self, model: torch.nn.Module) -> dict[str, float]:
        return {name: validation_loss(model, batches) for name, batches in self.eval_sets.items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self) -> Path:
        """Save coordinator + baselines for the last closed round (atomic directory rename)."""
        root = self.out / "checkpoints"
        r = self.coordinator.round
        final = root / f"round-{r:05d}"
        tmp = root / f".round-{r:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_state({**self.coordinator.state_dict(), "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down}, tmp / "coordinator")
        for b in self.baselines:
            save_state(b.state_dict(), tmp / f"baseline-{b.kind}")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.coordinator.checkpointed = r
        for old in self.checkpoints()[: -self.cfg.checkpoint.keep]:
            shutil.rmtree(root / f"round-{old:05d}", ignore_errors=True)
        return final

    def checkpoints(self) -> list[int]:
        root = self.out / "checkpoints"
        if not root.exists():
            return []
        return sorted(int(m.group(1)) for p in root.iterdir() if (m := _CKPT.match(p.name)))

    def _resume(self) -> None:
        rounds = self.checkpoints()
        if not rounds:
            self.metrics.truncate_after(-1)  # nothing to keep: start from round 0 again
            self.books.resumed_at(0)
            return
        path = self.out / "checkpoints" / f"round-{rounds[-1]:05d}"
        state = load_state(path / "coordinator")
        self.coordinator.load_state_dict(state)
        self.coordinator.checkpointed = self.coordinator.round
        self.bytes_up, self.bytes_down = state["bytes_up"], state["bytes_down"]
        for b in self.baselines:
            b.load_state_dict(load_state(path / f"baseline-{b.kind}"))
        self.metrics.truncate_after(self.coordinator.round)
        self.books.resumed_at(self.coordinator.round)
        self.progress.log(f"resumed {self.out} at round {self.coordinator.round}")

    # -- the end -----------------------------------------------------------------------------

    def finish(self) -> Path:
        """Export the global model in Hugging Face format to ``out/model``."""
        self.load_weights(self.coordinator.weights)
        path = export(self.model, self.tokenizer, self.out / "model")
        self.status.finished()
        return path

    def close(self) -> None:
        """Release the run folder (another process may then resume it)."""
        self.books.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def final_losses(self) -> dict[str, dict[str, float]]:
        """Last validation losses per run (federation, baselines) from the metrics."""
        last: dict[str, dict[str, float]] = {}
        for rec in read_metrics(self.out / "metrics.jsonl"):
            if rec["kind"] == "round" and rec.get("val_loss"):
                last[rec["run"]] = rec["val_loss"]
        return last


def held_out_batches(data: str | Path, seq_len: int, e: EvalConfig, purpose: str
                     ) -> list[torch.Tensor]:
    """The validation batches a run evaluates on for one prepared data folder (none when it
    is too small to hold out rows). A pool's held-out rows are its contributors' data too:
    consent applies."""
    ds = TokenDataset(data, "val", seq_len)
    if len(ds) == 0:
        return []
    return validation_batches(ds, e.batch_size, e.max_batches, consent_filter(data, purpose))


def _lock_run_folder(out: Path, wait_s: float = 120.0) -> object:
    """Hold an exclusive lock on the run folder for this process's lifetime.

    A coordinator that died abruptly can leave its ServerApp process alive for a few seconds;
    a resumed one waits for it to go rather than have two writers in one folder."""
    import fcntl

    handle = open(out / ".lock", "w")  # noqa: SIM115 - held until the process exits
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{out} is in use by another atoll process") from None
            time.sleep(1.0)


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)
