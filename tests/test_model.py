"""Model presets by size, and any Hugging Face config or model directory in their place."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atoll.model import PRESETS, ModelConfig, count_parameters, export
from atoll.tokenizer import byte_tokenizer

EXPECTED = {"tiny": 1.1e6, "small": 5.3e6, "60m": 58e6, "125m": 134e6, "350m": 374e6,
            "1b": 1.1e9, "7b": 6.7e9, "70b": 69.0e9}


class VocabOf32k:
    """Stands for a 32k-token tokenizer, for sizing presets without building one."""

    eos_token_id = bos_token_id = pad_token_id = 0

    def __len__(self) -> int:
        return 32000


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sizes(name):
    tok = byte_tokenizer() if name in ("tiny", "small") else VocabOf32k()
    cfg = ModelConfig(preset=name).hf_config(tok)
    with torch.device("meta"):  # shapes only: a 7B model is not allocated
        model = AutoModelForCausalLM.from_config(cfg)
    assert count_parameters(model) == pytest.approx(EXPECTED[name], rel=0.05)


def test_same_seed_same_init():
    a = ModelConfig().build(byte_tokenizer(), seed=5)
    b = ModelConfig().build(byte_tokenizer(), seed=5)
    c = ModelConfig().build(byte_tokenizer(), seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_config_file_and_pretrained_directory(tmp_path):
    tok = byte_tokenizer()
    source = ModelConfig(preset="tiny").build(tok, seed=3)
    export(source, tok, tmp_path / "m")
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(json.loads((tmp_path / "m" / "config.json").read_text())))

    fresh = ModelConfig(path=str(cfg_file)).build(tok, seed=0)
    assert count_parameters(fresh) == count_parameters(source)
    loaded = ModelConfig(path=str(tmp_path / "m"), pretrained=True).build(tok)
    assert all(torch.equal(p, q) for p, q in zip(source.parameters(), loaded.parameters(),
                                                 strict=True))
    assert AutoTokenizer.from_pretrained(tmp_path / "m").eos_token == tok.eos_token


def test_bad_model_settings():
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig(preset="huge").check()
    with pytest.raises(ValueError, match="needs model.path"):
        ModelConfig(pretrained=True).check()
