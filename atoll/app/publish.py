"""``atoll export``: a clean copy of a run's model, ready to publish.

The copy holds the weights (safetensors, in the dtype asked for), the tokenizer and the model
card, and nothing of the run folder (no checkpoints, no ledger key, no site state). It is
written under a temporary name and renamed into place, so a failed export leaves nothing
half-written and an existing copy untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from atoll.app.model_card import CARD, model_card
from atoll.app.paths_export import INDEX
from atoll.util.atomic import replace_directory

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def export_run(run_dir: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Copy the model of ``run_dir`` into ``out`` with weights in ``dtype``; returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = run_dir / "model"
    if (source / INDEX).exists():
        return _export_grid(source, out, DTYPES[dtype])
    if not (source / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}: no exported model (model/config.json); the run "
                                f"has not finished")
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the run's own model folder")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(source)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    note = f"\nWeights exported in {DTYPES[dtype]} by `atoll export`"
    if DTYPES[dtype] != torch.float32:
        note += " (the ledger's digest is of the fp32 weights in the run folder)"
    (tmp / CARD).write_text(model_card(run_dir, tmp) + note + ".\n")
    replace_directory(tmp, out)
    return out


def _export_grid(source: Path, out: Path, dtype: torch.dtype) -> Path:
    """A grid of paths: every path's model in ``dtype``, the router and the index."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the run's own model folder")
    hf_logging.disable_progress_bar()  # four bars a path say nothing
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in json.loads((source / INDEX).read_text())["paths"]:
        AutoModelForCausalLM.from_pretrained(source / name, dtype=dtype).save_pretrained(
            tmp / name, safe_serialization=True)
        AutoTokenizer.from_pretrained(source / name).save_pretrained(tmp / name)
    for name in (INDEX, "router.json", "router.safetensors"):
        shutil.copyfile(source / name, tmp / name)
    replace_directory(tmp, out)
    return out
