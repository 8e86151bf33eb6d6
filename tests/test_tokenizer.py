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
