"""``atoll prepare``: three formats in, packed rows + manifest out; malformed input refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atoll.cli import main
from atoll.data.prepare import PrepareOptions, prepare, val_mask
from atoll.data.reader import TokenDataset
from atoll.data.sources import DataError

DOC_A = "The quick brown fox jumps over the lazy dog. " * 20
DOC_B = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20


def make_inputs(tmp_path: Path) -> dict[str, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    txt = tmp_path / "a.txt"
    txt.write_text(DOC_A)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in
                               enumerate([DOC_A, DOC_B, DOC_B])) + "\n")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [DOC_B, DOC_A], "n": [1, 2]}), parquet)
    return {"txt": txt, "jsonl": jsonl, "parquet": parquet}


def test_three_formats_packed_with_end_of_text(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    m = prepare(list(inputs.values()), tmp_path / "out",
                PrepareOptions(seq_len=32, val_fraction=0.0, contributor="alice"), log=str)
    by_name = {Path(s["path"]).name: s for s in m["sources"]}
    # byte tokens: each document is its UTF-8 bytes plus one end-of-text token
    assert by_name["a.txt"]["tokens"] == len(DOC_A) + 1
    assert by_name["b.jsonl"]["tokens"] == len(DOC_A) + 2 * len(DOC_B) + 3
    assert by_name["b.jsonl"]["documents"] == 3 and by_name["c.parquet"]["documents"] == 2
    assert by_name["a.txt"]["sha256"] == hashlib.sha256(DOC_A.encode()).hexdigest()
    assert all(s["contributor"] == "alice" for s in m["sources"])

    ds = TokenDataset(tmp_path / "out", "train")
    rows = ds.rows(np.arange(len(ds)))
    assert rows.shape[1] == 32
    # the jsonl source is the documents joined by EOT (256), cut into rows of 32
    src = [i for i, s in enumerate(m["sources"]) if s["path"].endswith("b.jsonl")][0]
    stream = rows[ds.source_of(np.arange(len(ds))) == src].reshape(-1)
    expected = np.concatenate([np.frombuffer(d.encode(), np.uint8).astype(np.int64).tolist()
                               + [256] for d in (DOC_A, DOC_B, DOC_B)])
    assert np.array_equal(stream, expected[: len(stream)])
    assert len(stream) == (len(expected) // 32) * 32


def test_split_is_deterministic_and_exact(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(DOC_A * 40)
    m1 = prepare([big], tmp_path / "o1", PrepareOptions(seq_len=16, val_fraction=0.1), log=str)
    m2 = prepare([big], tmp_path / "o2", PrepareOptions(seq_len=16, val_fraction=0.1), log=str)
    assert m1["splits"]["val"]["rows"] == m2["splits"]["val"]["rows"] > 0
    a = TokenDataset(tmp_path / "o1", "val")
    b = TokenDataset(tmp_path / "o2", "val")
    assert np.array_equal(a.rows(np.arange(len(a))), b.rows(np.arange(len(b))))
    mask = val_mask(400, 0.1, "key")
    assert mask.sum() == 40  # every 10th block of 8 rows, whole blocks
    assert (mask.reshape(-1, 8).all(1) | ~mask.reshape(-1, 8).any(1)).all()


def test_shorter_seq_len_reads_stored_rows_in_pieces(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    prepare([inputs["txt"]], tmp_path / "out", PrepareOptions(seq_len=32, val_fraction=0),
            log=str)
    long = TokenDataset(tmp_path / "out", "train")
    short = TokenDataset(tmp_path / "out", "train", seq_len=8)
    assert len(short) == 4 * len(long)
    assert np.array_equal(short.rows(np.arange(4)).reshape(-1), long.rows(np.array([0]))[0])
    with pytest.raises(DataError, match="does not divide"):
        TokenDataset(tmp_path / "out", "train", seq_len=10)


def _malformed(tmp_path: Path, kind: str) -> tuple[Path, str]:
    p = tmp_path / {"binary": "blob.txt", "utf8": "latin1.txt", "empty": "empty.txt",
                    "field": "nofield.jsonl", "json": "broken.jsonl",
                    "parquet": "cut.parquet", "column": "nocol.parquet"}[kind]
    if kind == "binary":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return p, "looks binary"
    if kind == "utf8":
        p.write_bytes("café au lait\n".encode("latin-1"))
        return p, "invalid UTF-8 at byte 3"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "file is empty"
    if kind == "field":
        p.write_text('{"text": "ok"}\n{"body": "no text here"}\n')
        return p, "line 2: no 'text' field"
    if kind == "json":
        p.write_text('{"text": "ok"}\n{"text": "unterminated\n')
        return p, "line 2: not valid JSON"
    if kind == "column":
        pq.write_table(pa.table({"body": ["x" * 100]}), p)
        return p, "no column 'text'"
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"text": [DOC_A] * 50}), whole)
    raw = whole.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return p, "not a readable Parquet file"


KINDS = ["binary", "utf8", "empty", "field", "json", "parquet", "column"]


def _digest(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.iterdir())}


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_input_is_refused_and_earlier_shards_survive(tmp_path, kind):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    prepare([inputs["txt"], inputs["jsonl"]], out, PrepareOptions(seq_len=32), log=str)
    before = _digest(out)
    bad, reason = _malformed(tmp_path, kind)
    with pytest.raises(DataError) as err:
        prepare([inputs["txt"], bad], out, PrepareOptions(seq_len=32), log=str)
    assert str(bad) in str(err.value) and reason in str(err.value)
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "out", bad.name] + (
        ["whole.parquet"] if kind == "parquet" else []))  # no temporary directory left behind


@pytest.mark.parametrize("kind", ["binary", "utf8", "parquet"])
def test_cli_prints_one_line_and_exits_nonzero(tmp_path, capsys, kind):
    bad, reason = _malformed(tmp_path, kind)
    code = main(["prepare", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and str(bad) in err[0] and reason in err[0]
    assert not (tmp_path / "out").exists()
