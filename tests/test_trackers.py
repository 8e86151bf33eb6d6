"""report_to: the figures of metrics.jsonl reach TensorBoard, W&B and MLflow, read back from
what each tool wrote (event files, the offline .wandb log, the MLflow database)."""

from __future__ import annotations

import json
import struct
from collections import defaultdict

import pytest

from atoll.app.metrics import read_metrics
from atoll.app.simulate import simulate
from atoll.app.trackers import Trackers, check_trackers, scalars
from atoll.config import ConfigError
from tests.conftest import small_config
from tests.test_resume import crash_in_round

SITES = ["code", "speeches"]


def tensorboard_scalars(out):
    """{tag: {step: value}} from the run's event files; a step seen twice is an error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    found = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), (tag, steps)
        found[tag] = {e.step: e.value for e in events}
    return found


def wandb_history(out):
    """{tag: {step: value}} from the offline run's .wandb file: a LevelDB-style log of
    W&B's protobuf records (7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    raw, pos, part, found = path.read_bytes(), 7, b"", defaultdict(dict)
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block padding
            pos += left
            continue
        part, pos = part + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            rec = pb.Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in rec.history.item}
                for k, v in row.items():
                    if not k.startswith("_"):
                        found[k][row["_step"]] = v
    return found


def mlflow_history(out):
    """{tag: {step: [values]}} of the run's one MLflow run, and the run's parameters."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    found = defaultdict(lambda: defaultdict(list))
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            found[key][m.step].append(m.value)
    return found, run.data.params


def expected(out):
    """What every tool must hold: each record's numbers at its round, from metrics.jsonl."""
    want = defaultdict(dict)
    for rec in read_metrics(out / "metrics.jsonl"):
        for k, v in scalars(rec).items():
            want[k][rec["round"]] = v
    return want


def test_every_tool_gets_the_figures_of_metrics_jsonl(demo_data, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    cfg = small_config({s: demo_data[s] for s in SITES}, report_to=["tensorboard", "wandb",
                       "mlflow"], baseline={"kinds": ["data_parallel"]})
    out = simulate(cfg, tmp_path / "run", report=False).out
    want = expected(out)
    last = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"
            and r["run"] == "federation"][-1]
    # the names a person looks for, and their values from the record itself
    assert want["federation/val_loss/code"][3] == last["val_loss"]["code"]
    assert want["federation/bytes_up"][3] == last["bytes_up"]
    assert {"baseline:data_parallel/train_loss", "federation/site/speeches/norm",
            "federation/val_loss/mean", "federation/val_tokens/code"} <= want.keys()
    tb, wb = tensorboard_scalars(out), wandb_history(out)
    ml, params = mlflow_history(out)
    for tag, by_round in want.items():
        assert tb[tag] == pytest.approx(by_round, rel=1e-6), tag  # event files hold float32
        assert wb[tag] == pytest.approx(by_round, rel=1e-12), tag
        assert {s: v[-1] for s, v in ml[tag].items()} == pytest.approx(by_round), tag
    assert set(tb) == set(wb) == set(ml) == set(want)
    assert params["outer.lr"] == "0.7" and params["federation.rounds"] == "3"


def test_a_resumed_run_logs_each_round_once_to_tensorboard(demo_data, tmp_path):
    """Round 3 is logged, then lost in a crash before its checkpoint and run again: the
    event files hold it once, with the same values as an uninterrupted run's."""
    cfg = small_config({s: demo_data[s] for s in SITES}, report_to=["tensorboard", "mlflow"],
                       federation={"rounds": 4, "steps_per_round": 3},
                       checkpoint={"every": 2})
    straight = simulate(cfg, tmp_path / "straight", report=False).out
    out = tmp_path / "crashed"
    crash_in_round(cfg, out, at=4)
    assert 3 in tensorboard_scalars(out)["federation/val_loss/code"]
    simulate(cfg, out, resume=True, report=False)
    timing = ("seconds", "compute_seconds", "bytes")
    a, b = tensorboard_scalars(straight), tensorboard_scalars(out)
    assert a.keys() == b.keys()
    for tag in a:
        if not any(t in tag for t in timing):
            assert a[tag] == pytest.approx(b[tag], rel=1e-6), tag
    ml, _ = mlflow_history(out)  # the same MLflow run goes on; every round is there
    assert sorted(ml["federation/val_loss/code"]) == [0, 1, 2, 3, 4]


def test_scalars_of_a_record():
    rec = {"kind": "round", "run": "federation", "round": 2, "ended": 1.5e9, "tokens": 96,
           "train_loss": None, "val_loss": {"a": 2.0, "b": 3.0}, "sites": ["a", "b"],
           "rejected": {"b": "norm too large"}, "late": [], "epsilon": float("nan")}
    assert scalars(rec) == {"federation/tokens": 96.0, "federation/val_loss/a": 2.0,
                            "federation/val_loss/b": 3.0, "federation/val_loss/mean": 2.5}
    site = {"kind": "site", "run": "federation", "round": 1, "site": "a", "accepted": True,
            "norm": 0.5, "reason": None}
    assert scalars(site) == {"federation/site/a/accepted": 1.0, "federation/site/a/norm": 0.5}


def test_a_failing_tool_is_switched_off_and_the_others_go_on(tmp_path):
    class Broken:
        def log(self, values, step, when):
            raise OSError("disk full")

        def close(self):
            pass

    class Kept(Broken):
        seen: list = []

        def log(self, values, step, when):
            self.seen.append((step, values))

    lines = []
    t = Trackers([], tmp_path, "abc", {}, 0, log=lines.append)
    t.open = {"broken": Broken(), "kept": Kept()}
    for r in (1, 2):
        t.send({"kind": "round", "run": "federation", "round": r, "tokens": r})
    assert list(t.open) == ["kept"] and len(lines) == 1 and "disk full" in lines[0]
    assert Kept.seen == [(1, {"federation/tokens": 1.0}), (2, {"federation/tokens": 2.0})]


def test_an_unknown_tool_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown tool 'neptune'"):
        check_trackers(["tensorboard", "neptune"])
    path = tmp_path / "run.toml"
    path.write_text('report_to = ["tensorbored"]\n[[sites]]\nname = "a"\ndata = "."\n')
    from atoll.app.run_config import load_run_config

    with pytest.raises((ConfigError, ValueError), match="tensorbored"):
        load_run_config(path)
