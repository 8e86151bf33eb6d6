"""Paths (DiPaCo) against dense models on the demo federation, at equal tokens.

Three federations on the demo's four sites (one domain each), the same rounds, inner steps,
batch and codecs, so every site trains the same tokens in each:

- **dense tiny**: the ``tiny`` preset, every site trains all of it;
- **DiPaCo 2 x 2**: ``tiny``'s 4 blocks in two levels of two modules; each site trains one
  path a round (a model of ``tiny``'s size: the same memory and compute per site as the
  dense tiny run) on the rows routed to it, and the grid holds 4 paths;
- **dense, the grid's size**: ``tiny`` with 8 blocks (the grid's parameter count), every
  site trains all of it (twice the memory and compute per site).

Printed: validation loss per domain after the last round (the grid's with each held-out row
routed to its path), bytes per site and round each way, and each site's training memory:
counted (:func:`atoll.capacity.memory.device_memory`: weights, gradients, AdamW and
activations of the model it holds) and measured (the peak resident memory of a process that
builds the model a site of that run holds and takes inner steps on it with the site's
trainer, less what the process held before the model existed). The claim under test (the
paper's): the grid beats the dense model of one path's size at equal per-site compute.

    python bench/dipaco.py [--rounds 32] [--steps 3] [--batch 16] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from smoke import parse

from atoll.app.metrics import read_metrics
from atoll.app.run_config import load_run_config
from atoll.app.simulate import simulate
from atoll.capacity.memory import device_memory
from atoll.data.demo import build_demo_data
from atoll.model import PRESETS
from atoll.tokenizer import load_tokenizer

PEAK = """
import json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from atoll.train.inner import InnerConfig, InnerTrainer
a = json.loads(sys.argv[1])
sys.path.insert(0, a["bench"])
from peak_memory import peak_from_here, peak_since
def train(cfg, batch, steps):
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    trainer = InnerTrainer(model, InnerConfig(**a["inner"]), 100)
    ids = torch.randint(0, cfg["vocab_size"], (batch, a["seq_len"]))
    trainer.run(lambda: ids, steps)
torch.set_num_threads(1)
# the same code on a model of almost nothing first: torch's one-time costs (kernels, the
# autograd engine, thread pools) are then paid before the measurement starts
train({**a["model"], "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
       "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8}, 1, 2)
before = peak_from_here()
train(a["model"], a["batch"], 3)
print(peak_since(before))
"""
"""A process that holds and trains one site's model: the peak resident bytes that adds
(Linux: the high-water mark is reset once the imports are done)."""

SMOKE = {"rounds": 1, "steps": 2, "batch": 2, "tokens": 60_000, "eval_batches": 1}
GRID = ["model.paths.levels=[[0, 2], [2, 4]]", "model.paths.modules_per_level=[2, 2]"]


def runs(big_config: Path) -> dict[str, list[str]]:
    """Each run's name -> its config overrides."""
    return {"dense tiny (one path's size)": [],
            "DiPaCo 2 x 2 (paths of tiny's size)": GRID,
            "dense 8 blocks (the grid's size)": [f"model.path={big_config}"]}


def write_big_config(folder: Path) -> Path:
    """``tiny`` with twice the blocks: the grid's parameters as one dense model."""
    cfg = PRESETS["tiny"](len(load_tokenizer("")))
    cfg.num_hidden_layers *= 2
    path = folder / "tiny-8-blocks.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def site_peak_rss(model_config: dict, inner: dict, batch: int, seq_len: int) -> int:
    """Measured: the peak resident memory a site's model and trainer add to a process."""
    arg = json.dumps({"model": model_config, "inner": inner, "batch": batch,
                      "seq_len": seq_len, "bench": str(Path(__file__).resolve().parent)},
                     default=str)
    out = subprocess.run([sys.executable, "-c", PEAK, arg], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


def summary(out: Path, run, seq_len: int, batch: int) -> dict:
    """The figures of one finished run."""
    records = read_metrics(out / "metrics.jsonl")
    last = [r for r in records if r["kind"] == "round" and r["run"] == "federation"][-1]
    sites = [r for r in records if r["kind"] == "site" and r.get("accepted")]
    per = max(1, len(sites))  # accepted updates: bytes per site and round
    return {"val": last["val_loss"], "tokens": run.coordinator.tokens,
            "per_site": sum(p.numel() for p in run.model.parameters()),
            "total": sum(t.numel() for t in run.coordinator.weights.values()),
            "up": sum(r["bytes_up"] for r in sites) / per,
            "down": sum(r["bytes_down"] for r in sites) / per,
            "memory": device_memory(run.model.config, batch, seq_len, 1, 0, bf16=False).total,
            "rss": site_peak_rss(run.model.config.to_dict(), asdict(run.cfg.inner), batch,
                                 seq_len)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="inner steps per round (H)")
    ap.add_argument("--batch", type=int, default=16, help="rows of 128 tokens per step")
    ap.add_argument("--tokens", type=int, default=0, help="tokens per domain (0: the demo's)")
    ap.add_argument("--eval-batches", type=int, default=8, help="held-out batches per domain")
    args = parse(ap, SMOKE)
    tmp = Path(tempfile.mkdtemp(prefix="atoll-dipaco-"))
    data = tmp / "data"
    build_demo_data(data, **({"tokens_per_domain": args.tokens} if args.tokens else {}),
                    log=lambda s: None)
    common = [f"federation.rounds={args.rounds}", f"federation.steps_per_round={args.steps}",
              f"inner.batch_size={args.batch}", f"eval.batch_size={args.batch}",
              f"eval.max_batches={args.eval_batches}", f"eval.every={args.rounds}",
              'eval.at="coordinator"', "comm.down.delta=false", "baseline.kinds=[]"]
    results = {}
    with resources.as_file(resources.files("atoll") / "configs" / "demo.toml") as path:
        for name, extra in runs(write_big_config(tmp)).items():
            cfg = load_run_config(path, [*common, *extra], base=data)
            run = simulate(cfg, tmp / "run", report=False)
            results[name] = summary(tmp / "run", run, cfg.data.seq_len, args.batch)
            shutil.rmtree(tmp / "run")
            print(f"finished: {name}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    """The table, then the grid's loss against each dense model's."""
    first = next(iter(results.values()))
    domains = sorted(first["val"])
    print(f"\n{args.rounds} rounds x {args.steps} inner steps x 4 sites, {first['tokens']:,} "
          f"tokens in every run; bytes per site and round")
    print(f"{'run':<38} {'params/site':>11} {'total':>10} {'val mean':>9} "
          + " ".join(f"{d:>11}" for d in domains)
          + f" {'MB up':>7} {'MB down':>8} {'site memory':>12} {'site peak RSS':>14}")
    for name, r in results.items():
        mean = sum(r["val"].values()) / len(r["val"])
        print(f"{name:<38} {r['per_site']:>11,} {r['total']:>10,} {mean:>9.4f} "
              + " ".join(f"{r['val'][d]:>11.4f}" for d in domains)
              + f" {r['up'] / 1e6:>7.2f} {r['down'] / 1e6:>8.2f} "
              f"{r['memory'] / 2**20:>8.1f} MiB {r['rss'] / 2**20:>10.1f} MiB")
    means = {n: sum(r["val"].values()) / len(r["val"]) for n, r in results.items()}
    names = list(results)
    grid = means[names[1]]
    print(f"grid vs dense tiny (equal per-site compute): {(grid / means[names[0]] - 1) * 100:+.2f}%"
          f" loss; vs the dense model of the grid's size: "
          f"{(grid / means[names[2]] - 1) * 100:+.2f}%")


if __name__ == "__main__":
    main()
