"""Tokenizers: a byte-level default that needs no download, or any Hugging Face tokenizer.

The byte-level tokenizer maps byte ``b`` to token id ``b`` and adds one end-of-text token
(id 256). It is built as a real ``tokenizers`` byte-level BPE with no merges and wrapped in
``PreTrainedTokenizerFast``, so it saves with the model and reloads with
``AutoTokenizer.from_pretrained`` without any atoll code. Because the ids are the bytes
themselves, bulk encoding during data preparation is a zero-copy ``numpy`` view of the UTF-8
text (:func:`encode_fast`), which the tests check against the Hugging Face encoder.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOT = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 bytes + end-of-text


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table that byte-level BPE uses.

    Printable Latin-1 bytes stand for themselves; the rest are moved to code points from 256
    upward, so every byte has a visible, whitespace-free character.
    """
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The default tokenizer: one token per UTF-8 byte, id == byte value, plus end-of-text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    vocab[EOT] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOT, bos_token=EOT, pad_token=EOT, unk_token=None
    )


def load_tokenizer(path: str = "") -> PreTrainedTokenizerBase:
    """The byte-level tokenizer when ``path`` is empty, else a Hugging Face tokenizer directory."""
    if not path:
        return byte_tokenizer()
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist (a local directory)")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no end-of-text (eos) token")
    return tok


def is_byte_tokenizer(tok: PreTrainedTokenizerBase) -> bool:
    """Whether ``tok`` is atoll's byte-level tokenizer, whose ids are the UTF-8 bytes
    (so text can be encoded without calling it)."""
    return len(tok) == BYTE_VOCAB and tok.eos_token == EOT and tok.convert_tokens_to_ids("A") == 65


def encode_fast(tok: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    """Token ids of ``text`` (no special tokens) as int64: a byte view for the byte tokenizer."""
    if is_byte_tokenizer(tok):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
