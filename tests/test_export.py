"""The exported model is a plain Hugging Face model: it reloads, scores and generates."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atoll.app.metrics import read_metrics
from atoll.app.simulate import simulate
from atoll.data.reader import TokenDataset, validation_batches
from atoll.train.evaluate import validation_loss
from tests.conftest import small_config


def test_exported_model_reloads_and_matches_coordinator_loss(demo_data, tmp_path):
    cfg = small_config(demo_data, ["code", "shakespeare"])
    simulate(cfg, tmp_path / "run")
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "model.safetensors").exists()

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
            if r["kind"] == "round" and r["run"] == "federation"][-1]
    for name in ("code", "shakespeare"):
        batches = validation_batches(TokenDataset(demo_data[name], "val", cfg.data.seq_len),
                                     cfg.eval.batch_size, cfg.eval.max_batches)
        assert validation_loss(model, batches) == pytest.approx(last["val_loss"][name], abs=1e-6)

    ids = tok("def ", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 20
    assert tok.decode(out[0, : ids.shape[1]]) == "def "  # the saved tokenizer reads it back
    # greedy: each new token is the most likely one after all before it (one full pass)
    with torch.no_grad():
        logits = model(input_ids=out[:, :-1]).logits
    assert torch.equal(out[0, ids.shape[1]:], logits[0, ids.shape[1] - 1:].argmax(-1))
    assert (tmp_path / "run" / "report.html").exists()
    assert (tmp_path / "run" / "plots" / "validation_loss.png").read_bytes()[:4] == b"\x89PNG"
