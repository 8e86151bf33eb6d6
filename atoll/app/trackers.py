"""The tools ML teams already watch: a run's figures sent to TensorBoard, W&B and MLflow.

``report_to = ["tensorboard", "wandb", "mlflow"]`` (any subset) sends every record the run
appends to ``metrics.jsonl`` to these tools as well, as scalars named after the record:
``federation/val_loss/code``, ``baseline:data_parallel/train_loss``,
``federation/site/code/norm`` ..., at step = the round. ``metrics.jsonl`` stays the record of
the run; the trackers are views of it.

Each tool is an optional extra (``pip install 'atoll[tensorboard]'``), imported only when a
run asks for it, and none needs an account or a network:

* TensorBoard writes event files under ``RUN/tensorboard`` (``tensorboard --logdir RUN``).
* W&B runs offline under ``RUN/wandb`` (``wandb sync`` uploads it later) unless ``WANDB_MODE``
  or ``WANDB_API_KEY`` is set; a resumed run continues the same W&B run (its id is the run's).
* MLflow logs to ``sqlite:///RUN/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` names a server;
  a resumed run continues the same MLflow run.

A tool that fails mid-run is switched off with one line; the run and its metrics go on.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

TRACKERS = ("tensorboard", "wandb", "mlflow")
_SKIPPED = {"kind", "run", "round", "site", "ended"}


_NEEDS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"],
          "mlflow": ["mlflow", "sqlalchemy", "alembic"]}


def check_trackers(names: list[str]) -> None:
    """Refuse a tool atoll cannot report to, or one not installed, before any round runs."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to: unknown tool {name!r} (one of {', '.join(TRACKERS)})")
        missing = [m for m in _NEEDS[name] if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"report_to: {name} needs {', '.join(missing)}: pip install "
                             f"'atoll[{name}]'")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` record as named scalars: numbers (and booleans as 0/1) at the top
    level and one level down in dicts (per domain, per site); text and lists are left out."""
    prefix = record.get("run", "run")
    if record.get("kind") == "site":
        prefix += f"/site/{record.get('site', '?')}"
    elif record.get("kind") != "round":
        prefix += f"/{record.get('kind', 'record')}"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _SKIPPED:
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                _put(out, f"{prefix}/{key}/{sub}", v)
            if key == "val_loss" and value and all(_number(v) for v in value.values()):
                out[f"{prefix}/val_loss/mean"] = sum(value.values()) / len(value)
        else:
            _put(out, f"{prefix}/{key}", value)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(float(v))


def _put(out: dict[str, float], name: str, v: Any) -> None:
    if _number(v):
        out[name] = float(v)


class Tracker(Protocol):
    """Where scalars go: one call per record, then one ``close`` at the end."""

    def log(self, values: dict[str, float], step: int, when: float) -> None:
        """Record ``values`` at ``step`` (the round), stamped ``when`` (Unix seconds)."""

    def close(self) -> None:
        """Flush and finish; nothing is logged after."""


class TensorBoard:
    """Event files under ``RUN/tensorboard``; a resume purges the steps it runs again."""

    def __init__(self, out: Path, run_id: str, config: dict[str, Any], start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start)
        if not start:
            self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in
                                                     _flat(config).items()))

    def log(self, values: dict[str, float], step: int, when: float) -> None:
        """See :meth:`Tracker.log`."""
        for name, v in values.items():
            self.writer.add_scalar(name, v, step, walltime=when)
        self.writer.flush()

    def close(self) -> None:
        """See :meth:`Tracker.close`."""
        self.writer.close()


class WandB:
    """A W&B run (offline unless the environment says otherwise) whose id is the run's."""

    def __init__(self, out: Path, run_id: str, config: dict[str, Any], start: int) -> None:
        import wandb

        online = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "atoll"), name=out.name, id=run_id,
            dir=str(out), config=config, resume="allow",
            mode=None if online else "offline", settings=wandb.Settings(silent=True))

    def log(self, values: dict[str, float], step: int, when: float) -> None:
        """See :meth:`Tracker.log`."""
        self.run.log(values, step=step)

    def close(self) -> None:
        """See :meth:`Tracker.close`."""
        self.run.finish()


class MLflow:
    """An MLflow run, found again by its ``atoll.run_id`` tag when the run resumes."""

    def __init__(self, out: Path, run_id: str, config: dict[str, Any], start: int) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve()}/mlflow.db"
        self.client = MlflowClient(uri)
        name = str(config.get("name", "atoll"))
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        found = self.client.search_runs([exp_id], f"tags.`atoll.run_id` = '{run_id}'")
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(
                exp_id, run_name=out.name, tags={"atoll.run_id": run_id}).info.run_id
            for key, v in _flat(config).items():  # MLflow caps a parameter at 6000 chars
                self.client.log_param(self.run_id, key[:250], str(v)[:6000])

    def log(self, values: dict[str, float], step: int, when: float) -> None:
        """See :meth:`Tracker.log`."""
        from mlflow.entities import Metric

        ms = int(when * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step)
                                                    for k, v in values.items()])

    def close(self) -> None:
        """See :meth:`Tracker.close`."""
        self.client.set_terminated(self.run_id)


_BUILDERS: dict[str, Callable[..., Tracker]] = {
    "tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"inner": {"lr": 1e-3}}`` as ``{"inner.lr": 1e-3}`` (lists of tables stay whole)."""
    out: dict[str, Any] = {}
    for key, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = v
    return out


class Trackers:
    """The run's trackers; ``send`` forwards one ``metrics.jsonl`` record to each."""

    def __init__(self, names: list[str], out: Path, run_id: str, config: dict[str, Any],
                 start: int, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.open: dict[str, Tracker] = {}
        for name in names:
            self.open[name] = _BUILDERS[name](Path(out), run_id, config, start)

    def send(self, record: dict[str, Any]) -> None:
        """Forward ``record``; a tool that raises is switched off, the run goes on."""
        values = scalars(record)
        if not values or not self.open:
            return
        step, when = int(record.get("round", 0)), float(record.get("ended") or time.time())
        for name, tracker in list(self.open.items()):
            try:
                tracker.log(values, step, when)
            except Exception as e:  # noqa: BLE001 - any failure of a tool is the tool's
                self.log(f"report_to: {name} failed ({type(e).__name__}: {e}); "
                         f"no more figures go to it, metrics.jsonl goes on")
                del self.open[name]

    def close(self) -> None:
        """Close every tool (flushes TensorBoard, finishes W&B and MLflow runs)."""
        for name, tracker in self.open.items():
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001
                self.log(f"report_to: closing {name} failed ({type(e).__name__}: {e})")
        self.open = {}
