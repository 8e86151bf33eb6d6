"""``atoll prepare`` at scale: streamed in bounded pieces, byte-identical to the whole-file
algorithm it replaced, uint32 shards for a vocabulary over 65,536 ids, the same output on any
number of worker processes."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import atoll.data.encode as encode_mod
import atoll.data.sources as sources_mod
from atoll.cli import main
from atoll.data.prepare import PrepareOptions, prepare
from atoll.data.reader import TokenDataset
from atoll.data.shards import shard_dtype
from atoll.data.sources import DataError, read_pieces
from atoll.model import ModelConfig

BIG_VOCAB = 70_000

# sha256 over a prepared directory (see digest) of write_corpus, as the earlier whole-file
# `atoll prepare` (the stream of each source held as one int64 array) wrote it
OLD_DIGESTS = {
    "full": "82f00334d3df8334653c82cee4e2ee519d24c3089a2c8ad361144bdcd675d117",
    "max": "2dc9bf13dd64317bd5f4cadb31b0e363b6246c2ccb95c9c534bc843b754e7d38",
}
RUNS = {"full": PrepareOptions(seq_len=32, val_fraction=0.1),
        "max": PrepareOptions(seq_len=16, val_fraction=0.25, max_tokens_per_source=3000)}


def write_corpus(root: Path) -> list[Path]:
    """A text file of many lines (multi-byte characters included), a JSONL file and a text
    file too short for validation rows."""
    rng = np.random.default_rng(7)
    words = ["ab", "ol", "ut", "ké", "zoë", "日本", "sti", "nor", "a", "quvv", "→", "x"]

    def text(n: int) -> str:
        return " ".join(words[i] for i in rng.integers(0, len(words), n))
    root.mkdir(parents=True, exist_ok=True)
    a, b, c = root / "a.txt", root / "b.jsonl", root / "c.txt"
    a.write_text("\n".join(text(int(rng.integers(1, 30))) for _ in range(900)) + "\n",
                 encoding="utf-8")
    b.write_text("".join(json.dumps({"text": text(int(rng.integers(1, 300)))}) + "\n"
                         for _ in range(150)), encoding="utf-8")
    c.write_text(text(40), encoding="utf-8")
    return [a, b, c]


def digest(out: Path) -> str:
    """Every file of a prepared directory, the manifest's source paths cut to file names."""
    h = hashlib.sha256()
    for f in sorted(out.iterdir()):
        raw = f.read_bytes()
        if f.name == "manifest.json":
            m = json.loads(raw)
            for s in m["sources"]:
                s["path"] = Path(s["path"]).name
            raw = json.dumps(m, indent=1).encode()
        h.update(f.name.encode() + b"\0" + raw)
    return h.hexdigest()


@pytest.mark.parametrize("piece", [0, 7, 1000])  # 0: the default sizes
def test_streamed_output_is_byte_identical_to_the_whole_file_algorithm(tmp_path, monkeypatch,
                                                                      piece):
    if piece:  # tiny pieces and chunks: cuts inside lines and inside UTF-8 characters
        monkeypatch.setattr(sources_mod, "PIECE_BYTES", piece)
        monkeypatch.setattr(encode_mod, "CHUNK_CHARS", 3 * piece)
    files = write_corpus(tmp_path / "in")
    for name, opts in RUNS.items():
        prepare(files, tmp_path / name, opts, log=str)
        assert digest(tmp_path / name) == OLD_DIGESTS[name], name


def test_text_file_is_read_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "PIECE_BYTES", 1000)
    text = "".join(f"línea {i} → ✓ 日本語\n" if i % 7 else "x" * 2500 for i in range(400))
    p = tmp_path / "long.txt"
    p.write_text(text, encoding="utf-8")
    pieces = list(read_pieces(p))
    assert "".join(t for t, _ in pieces) == text
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert max(len(t.encode()) for t, _ in pieces) <= 2000 and len(pieces) > 20
    bad = tmp_path / "bad.txt"
    bad.write_bytes(text.encode()[:5000] + "é".encode("latin-1"))  # past the first piece
    with pytest.raises(DataError, match="invalid UTF-8 at byte 5000"):
        list(read_pieces(bad))


def test_shard_dtype_widens_past_65536_ids():
    assert shard_dtype(257) == np.uint16 and shard_dtype(1 << 16) == np.uint16
    assert shard_dtype((1 << 16) + 1) == np.uint32


def _words(n: int) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwxyz" for v in "aeiou"]
    out = [*syllables, *map("".join, itertools.product(syllables, repeat=2))]
    return (out + list(map("".join, itertools.product(syllables, repeat=3))))[:n]


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory) -> Path:
    """A word-level Hugging Face tokenizer of 70,000 ids, saved to a directory."""
    vocab = {"<unk>": 0, "</s>": 1}
    vocab.update((w, i + 2) for i, w in enumerate(_words(BIG_VOCAB - 2)))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    path = tmp_path_factory.mktemp("tok") / "big"
    tok.save_pretrained(path)
    return path


def _big_docs(n_docs: int) -> list[str]:
    words = _words(BIG_VOCAB - 2)
    rng = np.random.default_rng(1)
    return [" ".join(words[i] for i in rng.integers(0, len(words), int(rng.integers(5, 200))))
            for _ in range(n_docs)]


def test_vocabulary_over_65536_ids_round_trips_through_uint32_shards(tmp_path, big_tokenizer,
                                                                     capsys):
    docs = _big_docs(60)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert main(["prepare", str(src), "--out", str(tmp_path / "out"), "--seq-len", "16",
                 "--val-fraction", "0", "--tokenizer", str(big_tokenizer)]) == 0
    out = capsys.readouterr().out
    assert "prepared 0.0 MB from 1 source in " in out and " MB/s, " in out and " tokens)" in out
    ds = TokenDataset(tmp_path / "out", "train")
    assert ds.manifest["dtype"] == "uint32" and ds.manifest["vocab_size"] == BIG_VOCAB
    stream = ds.rows(np.arange(len(ds))).reshape(-1)
    assert stream.max() > 65_535 and (stream > 65_535).mean() > 0.02
    tok = PreTrainedTokenizerFast.from_pretrained(big_tokenizer)
    expected = [i for d in docs for i in tok(d, add_special_tokens=False)["input_ids"] + [1]]
    assert stream.tolist() == expected[: len(stream)]
    eot = np.flatnonzero(stream == 1)
    assert tok.decode(stream[eot[2] + 1 : eot[3]].tolist()) == docs[3]
    # a model for this tokenizer gets its vocabulary, and ids past 65,535 index its embedding
    model = ModelConfig(preset="tiny").build(tok)
    assert model.config.vocab_size == BIG_VOCAB
    import torch
    logits = model(torch.from_numpy(ds.rows(np.arange(2)))).logits
    assert logits.shape == (2, 16, BIG_VOCAB)


def test_worker_processes_give_the_same_bytes(tmp_path, big_tokenizer, monkeypatch):
    monkeypatch.setattr(encode_mod, "CHUNK_CHARS", 4000)  # many chunks in flight at once
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in _big_docs(300)))
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(_big_docs(200)) + "\n")
    for workers in (1, 2):
        prepare([src, text], tmp_path / f"w{workers}", PrepareOptions(
            seq_len=32, tokenizer=str(big_tokenizer), workers=workers,
            max_tokens_per_source=10_000), log=str)
    assert digest(tmp_path / "w1") == digest(tmp_path / "w2")
    m = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert [s["tokens"] for s in m["sources"]] == [10_000, 10_000]


def test_reader_refuses_an_unknown_dtype(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("some text to fill a few rows. " * 20)
    prepare([src], tmp_path / "out", PrepareOptions(seq_len=16, val_fraction=0), log=str)
    path = tmp_path / "out" / "manifest.json"
    m = json.loads(path.read_text())
    m["dtype"] = "float32"
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match="unknown token dtype 'float32'"):
        TokenDataset(tmp_path / "out")


def test_a_source_under_two_val_blocks_is_all_train_even_where_its_offset_is_zero(tmp_path):
    """With val_fraction 0.5 a source whose hash gives offset 0 would put block 0 in val;
    under 2 * VAL_BLOCK rows it must not (its first rows are held back until that is known)."""
    from atoll.data.prepare import VAL_BLOCK, file_sha256, val_rule

    src = tmp_path / "short.txt"
    for n in itertools.count():  # a text whose key puts the first block in validation
        src.write_text(f"short source number {n}. " * 8)
        if val_rule(0.5, file_sha256(src))(0, 1)[0]:
            break
    rows = len(src.read_bytes()) // 16
    assert rows < 2 * VAL_BLOCK
    m = prepare([src], tmp_path / "out", PrepareOptions(seq_len=16, val_fraction=0.5), log=str)
    assert (m["sources"][0]["train_rows"], m["sources"][0]["val_rows"]) == (rows, 0)
    src.write_text(src.read_text() * 3)  # 2 * VAL_BLOCK rows or more: half go to val
    m = prepare([src], tmp_path / "out", PrepareOptions(seq_len=16, val_fraction=0.5), log=str)
    assert m["sources"][0]["val_rows"] > 0
