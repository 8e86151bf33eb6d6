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


def test_model_card_and_clean_export(demo_data, tmp_path, capsys):
    """model/README.md names the sites, shares and ledger head, and the weights' digest it
    quotes is the digest of the exported weights; ``atoll export`` writes a bf16 copy."""
    from safetensors.torch import load_file

    from atoll.cli import main
    from atoll.util.hashing import tensors_digest

    cfg = small_config(demo_data, ["code", "shakespeare"])
    simulate(cfg, tmp_path / "run")
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| code |" in card and "| shakespeare |" in card and "pretraining" in card
    assert "## Contributors" in card and "head `" in card
    weights = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert f"`{tensors_digest(weights)}`" in card
    assert "| federation |" in card  # (no baseline in this config)

    out = tmp_path / "publish"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--dtype", "bf16"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    assert "exported in torch.bfloat16" in (out / "README.md").read_text()
    for name, t in load_file(out / "model.safetensors").items():
        assert torch.equal(t, weights[name].to(torch.bfloat16))

    capsys.readouterr()
    assert main(["export", str(tmp_path / "nothing"), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no exported model" in err[0]
    assert (out / "model.safetensors").exists()  # the earlier copy is untouched
