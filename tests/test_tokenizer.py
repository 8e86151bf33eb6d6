"""The byte-level tokenizer: ids are bytes, it round-trips, and it reloads without atoll."""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer

from atoll.tokenizer import BYTE_VOCAB, byte_tokenizer, encode_fast

TEXT = "Hwæt! déf f(x):\n\treturn 'ünïcode' → ✓ 日本語 <|endoftext|> tail"


def test_ids_are_utf8_bytes():
    tok = byte_tokenizer()
    ids = tok("héllo\n", add_special_tokens=False)["input_ids"]
    assert ids == list("héllo\n".encode())
    assert len(tok) == BYTE_VOCAB and tok.eos_token_id == 256


def test_special_token_and_decode_round_trip():
    tok = byte_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ids.count(256) == 1
    assert tok.decode(ids) == TEXT


def test_fast_path_matches_hugging_face_encoder():
    tok = byte_tokenizer()
    text = TEXT.replace("<|endoftext|>", "")
    assert np.array_equal(encode_fast(tok, text), tok(text, add_special_tokens=False)["input_ids"])


def test_saved_tokenizer_reloads_with_autotokenizer(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(TEXT, add_special_tokens=False)["input_ids"] == \
        byte_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    assert again.eos_token == "<|endoftext|>"


def test_any_local_hugging_face_tokenizer_replaces_the_default(tmp_path):
    """A BPE tokenizer trained here and saved to a directory: data is prepared with it, the
    model is sized to it, and it is saved with the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from atoll.app.run_config import RunConfig
    from atoll.app.simulate import simulate
    from atoll.config import from_dict
    from atoll.data.prepare import PrepareOptions, prepare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog and keeps running " * 400)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train([str(corpus)], trainers.BpeTrainer(vocab_size=300,
                                                 special_tokens=["<unk>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    tok.save_pretrained(tmp_path / "tok")

    m = prepare([corpus], tmp_path / "data", PrepareOptions(seq_len=16, val_fraction=0.2,
                                                            tokenizer=str(tmp_path / "tok")),
                log=str)
    assert m["vocab_size"] == len(tok) and m["eot_id"] == tok.eos_token_id
    cfg = from_dict(RunConfig, {
        "threads": 1, "tokenizer": str(tmp_path / "tok"), "data": {"seq_len": 16},
        "inner": {"batch_size": 2}, "federation": {"rounds": 1, "steps_per_round": 2},
        "baseline": {"kinds": []}, "sites": [{"name": "a", "data": str(tmp_path / "data")}]})
    run = simulate(cfg, tmp_path / "run", report=False)
    assert run.model.config.vocab_size == len(tok)
    again = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert again("quick fox")["input_ids"] == tok("quick fox")["input_ids"]
