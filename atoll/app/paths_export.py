"""A grid of paths as a person uses it: every path a Hugging Face model directory, plus the
router that picks one for a prompt.

``model/`` of a paths run holds ``paths.json`` (the grid and each path's folder), the
router (``router.safetensors``, ``router.json``) and one folder per path (``p0-1/``), each
loadable on its own with ``AutoModelForCausalLM.from_pretrained``. At inference a document
runs through one path, as it did in training::

    from atoll.app.paths_export import load_for_prompt
    model, tokenizer, path = load_for_prompt("runs/x/model", "def main(")
"""

from __future__ import annotations

import json
from pathlib import Path as FilePath

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from atoll.model import export
from atoll.paths.grid import Path, PathsConfig, path_name, path_weights
from atoll.paths.router import Router
from atoll.tokenizer import encode_fast
from atoll.util.atomic import write_atomic

INDEX = "paths.json"


def export_paths(grid: dict[str, torch.Tensor], cfg: PathsConfig, hf_config: PretrainedConfig,
                 tokenizer: PreTrainedTokenizerBase, router: Router, out: FilePath) -> FilePath:
    """Write every path of ``grid`` as its own model directory under ``out``, the router and
    the index; each path directory is replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    for path in cfg.paths():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        model.load_state_dict(path_weights(grid, path, cfg), strict=True)
        export(model, tokenizer, out / path_name(path))
    router.save(out)
    index = {"levels": cfg.levels, "modules_per_level": cfg.modules_per_level,
             "paths": [path_name(p) for p in cfg.paths()]}
    write_atomic(out / INDEX, json.dumps(index, indent=1).encode())
    return out


def route_prompt(model_dir: str | FilePath, prompt: str) -> Path:
    """The path a prompt runs through (its first tokens, as training rows were routed)."""
    model_dir = FilePath(model_dir)
    index = json.loads((model_dir / INDEX).read_text())
    cfg = PathsConfig(index["levels"], index["modules_per_level"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir / index["paths"][0])
    router = Router.load(model_dir)
    ids = encode_fast(tokenizer, prompt)
    path = router.route_rows(ids[None, :])[0]
    if path not in set(cfg.paths()):
        raise ValueError(f"{model_dir}: the router names path {path}, not in the grid")
    return path


def load_for_prompt(model_dir: str | FilePath, prompt: str
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """The model of the path ``prompt`` routes to, its tokenizer, and the path."""
    path = route_prompt(model_dir, prompt)
    folder = FilePath(model_dir) / path_name(path)
    return (AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
            path)
