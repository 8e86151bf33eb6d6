"""The model: a Hugging Face causal LM from a named preset, a config file or a local model.

Presets are small functions returning a ``LlamaConfig`` (a registry kept boring on purpose).
Only ``tiny`` is meant to train on a laptop CPU; the others are defined so that a federation
of real GPUs can name them. Any ``config.json`` or local model directory works as well.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from atoll.paths.grid import PathsConfig
from atoll.util.atomic import replace_directory


def _llama(hidden: int, layers: int, heads: int, ffn: int, kv_heads: int | None = None,
           context: int = 2048) -> Callable[[int], LlamaConfig]:
    def make(vocab_size: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads,
            intermediate_size=ffn,
            max_position_embeddings=context,
            tie_word_embeddings=False,
        )

    return make


# name -> config factory taking the tokenizer's vocabulary size. Parameter counts are with the
# byte-level vocabulary (tiny, small) or a 32k vocabulary (the rest).
PRESETS: dict[str, Callable[[int], LlamaConfig]] = {
    "tiny": _llama(hidden=128, layers=4, heads=4, ffn=512, context=1024),  # 1.1M: CPU demo
    "small": _llama(hidden=256, layers=6, heads=8, ffn=768, context=1024),  # 5.3M
    "60m": _llama(hidden=512, layers=8, heads=8, ffn=1408),  # 58M
    "125m": _llama(hidden=768, layers=12, heads=12, ffn=2048),  # 134M
    "350m": _llama(hidden=1024, layers=24, heads=16, ffn=2816),  # 374M
    "1b": _llama(hidden=2048, layers=22, heads=32, ffn=5632, kv_heads=4),  # 1.1B
    "7b": _llama(hidden=4096, layers=32, heads=32, ffn=11008, context=4096),  # 6.7B
    # Llama-2-70B's shape, for planning (atoll plan) and meta-device tests: 69.0B
    "70b": _llama(hidden=8192, layers=80, heads=64, ffn=28672, kv_heads=8, context=4096),
}


@dataclass
class ModelConfig:
    """Which causal LM a run trains."""

    preset: str = "tiny"
    """A preset name (tiny, small, 60m, 125m, 350m, 1b, 7b, 70b); ignored when ``path``
    is set."""
    path: str = ""
    """A local ``config.json`` or Hugging Face model directory to use instead of a preset."""
    pretrained: bool = False
    """With a model directory in ``path``: start from its weights instead of a fresh init."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    """Split the blocks into levels of modules, each site training one path of them
    (DiPaCo, :mod:`atoll.paths`); empty: a dense model."""

    def check(self) -> None:
        """Refuse an unknown preset, pretrained weights without a model directory, or a grid
        of paths that cannot be."""
        if not self.path and self.preset not in PRESETS:
            raise ValueError(f"unknown model preset '{self.preset}' (one of {', '.join(PRESETS)})")
        if self.pretrained and not self.path:
            raise ValueError("model.pretrained needs model.path (a model directory)")
        self.paths.check()

    def hf_config(self, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
        """The Hugging Face config, with token ids taken from the tokenizer."""
        if self.path:
            p = Path(self.path)
            if not p.exists():
                raise FileNotFoundError(f"model path {p} does not exist")
            if p.is_file():
                cfg = AutoConfig.for_model(**json.loads(p.read_text()))
            else:
                cfg = AutoConfig.from_pretrained(p)
        else:
            cfg = PRESETS[self.preset](len(tokenizer))
        if cfg.vocab_size < len(tokenizer):
            raise ValueError(f"model vocab_size {cfg.vocab_size} < tokenizer size {len(tokenizer)}")
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        return cfg

    def build(self, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
        """A float32 model on CPU; the same seed gives the same initial weights everywhere."""
        if self.pretrained:
            return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(self.hf_config(tokenizer),
                                                    dtype=torch.float32)


def count_parameters(model: torch.nn.Module) -> int:
    """The number of values in the model's parameters (a tied tensor counts once)."""
    return sum(p.numel() for p in model.parameters())


def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Save model + tokenizer in Hugging Face format (safetensors), atomically.

    The result loads with ``AutoModelForCausalLM.from_pretrained(out)``.
    """
    import shutil

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one file for a small model: the bar is noise
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_directory(tmp, out)
    return out


@torch.no_grad()
def generate_sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str,
                    max_new_tokens: int = 120, seed: int = 0) -> str:
    """A short sampled continuation of ``prompt`` (temperature 0.8, top-k 40)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
                             top_k=40, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
