"""The command line end to end: simulate writes a complete run folder; resume and report."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from atoll.app.metrics import read_metrics
from atoll.cli import main


def test_simulate_resume_report(demo_data, tmp_path, capsys):
    cfg = tmp_path / "fed.toml"
    cfg.write_text(f"""
name = "cli"
threads = 1
[data]
seq_len = 64
[inner]
batch_size = 4
warmup_steps = 1
[federation]
rounds = 2
steps_per_round = 2
[eval]
max_batches = 1
[baseline]
kinds = ["data_parallel", "sequential"]
[[sites]]
name = "code"
data = "{demo_data['code']}"
[[sites]]
name = "speeches"
data = "{demo_data['speeches']}"
""")
    out = tmp_path / "run"
    assert main(["simulate", str(cfg), "--out", str(out), "inner.lr=0.002"]) == 0
    for name in ("config.toml", "metrics.jsonl", "run.json", "report.html", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json", "plots/bytes_on_wire.png",
                 "plots/site_tokens.png", "checkpoints/round-00002/coordinator/state.json",
                 "ledger.sqlite", "ledger.sqlite.head", "ledger.key.pub"):
        assert (out / name).exists(), name
    assert "lr = 0.002" in (out / "config.toml").read_text()
    records = read_metrics(out / "metrics.jsonl")
    runs = {r["run"] for r in records}
    assert runs == {"federation", "baseline:data_parallel", "baseline:sequential"}
    rounds = {r["run"]: r for r in records if r["kind"] == "round" and r["round"] == 2}
    # equal tokens: each baseline is level with the federation
    assert rounds["baseline:data_parallel"]["tokens"] == rounds["federation"]["tokens"]
    assert rounds["baseline:sequential"]["tokens"] == rounds["federation"]["tokens"]
    assert rounds["baseline:sequential"]["step"] == 2 * rounds["baseline:data_parallel"]["step"]
    summary = capsys.readouterr().out
    assert "baseline:data_parallel" in summary and "speeches" in summary
    # the bytes yardstick: an fp32 ring all-reduce between the two sites after each of the
    # round's two steps; each site sends and receives 2 (n-1)/n = 1 gradient of 4 B values
    params = sum(t.numel() for t in load_file(out / "model" / "model.safetensors").values())
    assert rounds["federation"]["dp_bytes"] == 2 * 2 * 2 * 1 * params * 4  # sites x steps x dir
    fed = [r for r in records if r["kind"] == "round" and r["run"] == "federation"]
    moved = sum(r["bytes_up"] + r["bytes_down"] for r in fed)
    ratio = sum(r["dp_bytes"] for r in fed) / moved
    assert f"{ratio:.1f}x fewer bytes" in summary

    weights = load_file(out / "model" / "model.safetensors")
    assert main(["simulate", "--resume", str(out)]) == 0  # finished: nothing more to do
    again = load_file(out / "model" / "model.safetensors")
    assert all((weights[k] == again[k]).all() for k in weights)
    assert len(read_metrics(out / "metrics.jsonl")) == len(records)

    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "phase: finished" in status and "round: 2/2" in status
    assert "connected sites (2): code, speeches" in status and "last closed round 2" in status

    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").exists()
    page = (out / "report.html").read_text()
    who = page.split("Who contributed what")[1]  # plain prepared data: credited to the site
    assert "<td>code</td>" in who and "<td>speeches</td>" in who and "verified" in who
    assert json.loads((out / "run.json").read_text())["name"] == "cli"


def test_existing_run_folder_is_not_overwritten(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"run_id": "x"}')
    cfg = tmp_path / "fed.toml"
    cfg.write_text(f'[[sites]]\nname = "a"\ndata = "{demo_data["code"]}"\n')
    assert main(["simulate", str(cfg), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "run.json").read_text() == '{"run_id": "x"}'
