"""``atoll prepare``: input files -> packed token shards (numpy memmap) + a manifest.

Layout of a prepared directory::

    manifest.json          sources (path, sha256, tokens, contributor), splits, shards
    train-00000.bin        uint16/uint32 rows of ``seq_len`` tokens (np.memmap)
    train-sources.npy      int32: for each train row, the index of the source it came from
    val-00000.bin, val-sources.npy

Each source file is tokenised, its documents joined with end-of-text tokens and packed into
rows of ``seq_len`` tokens. A row never spans two sources, so consent and credit can be
tracked per source; the last partial row of a source is dropped (counted in the manifest).
The validation split takes every k-th block of ``VAL_BLOCK`` rows of each source, starting at
an offset derived from the source's hash: deterministic, an exact fraction, and spread
through each source rather than taken from its end.

Everything is written into a temporary directory and renamed into place only when all inputs
were read, so a malformed input never damages an earlier preparation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from atoll.data.sources import DataError, expand_inputs, read_documents
from atoll.tokenizer import encode_fast, load_tokenizer
from atoll.util.atomic import replace_directory
from atoll.util.hashing import seed_of

FORMAT = "atoll-tokens/1"
VAL_BLOCK = 8  # rows per validation block
SHARD_ROWS = 1 << 18  # rows per shard file (32M tokens at seq_len 128)


@dataclass
class PrepareOptions:
    """How ``atoll prepare`` turns files into token rows."""

    seq_len: int = 128
    val_fraction: float = 0.05
    text_field: str = "text"
    tokenizer: str = ""  # "" = byte-level
    contributor: str = ""
    max_tokens_per_source: int = 0  # 0 = no limit (used to keep the demo small)


@dataclass
class _ShardWriter:
    """Appends rows to ``{split}-NNNNN.bin`` files, rolling over every ``SHARD_ROWS`` rows."""

    root: Path
    split: str
    dtype: np.dtype
    seq_len: int
    shards: list[dict] = field(default_factory=list)
    sources: list[np.ndarray] = field(default_factory=list)
    _fh: object | None = None
    _rows_in_shard: int = 0

    def write(self, rows: np.ndarray, source: int) -> None:
        start = 0
        while start < len(rows):
            if self._fh is None or self._rows_in_shard == SHARD_ROWS:
                self._roll()
            take = min(SHARD_ROWS - self._rows_in_shard, len(rows) - start)
            self._fh.write(rows[start : start + take].astype(self.dtype).tobytes())
            self._rows_in_shard += take
            self.shards[-1]["rows"] += take
            start += take
        self.sources.append(np.full(len(rows), source, dtype=np.int32))

    def _roll(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = open(self.root / name, "wb")
        self._rows_in_shard = 0
        self.shards.append({"file": name, "rows": 0})

    def close(self) -> dict:
        if self._fh is not None:
            self._fh.close()
        src = np.concatenate(self.sources) if self.sources else np.zeros(0, np.int32)
        np.save(self.root / f"{self.split}-sources.npy", src)
        return {"rows": int(len(src)), "shards": [s for s in self.shards if s["rows"] > 0]}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read a MiB at a time: what identifies a source."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def val_mask(n_rows: int, val_fraction: float, key: str) -> np.ndarray:
    """Which rows of a source go to validation: every k-th block, offset by the source key."""
    mask = np.zeros(n_rows, dtype=bool)
    if val_fraction <= 0 or n_rows < 2 * VAL_BLOCK:
        return mask
    k = max(2, round(1 / val_fraction))
    offset = seed_of(key, hex_digits=64) % k
    blocks = np.arange(n_rows) // VAL_BLOCK
    mask[(blocks + offset) % k == 0] = True
    return mask


def tokenize_source(path: Path, tok: PreTrainedTokenizerBase, opts: PrepareOptions
                    ) -> tuple[np.ndarray, int]:
    """The token stream of one file (documents joined by end-of-text) and its document count."""
    parts, n_docs, total = [], 0, 0
    eot = np.array([tok.eos_token_id], dtype=np.int64)
    for doc in read_documents(path, opts.text_field):
        ids = encode_fast(tok, doc)
        parts += [ids, eot]
        n_docs += 1
        total += len(ids) + 1
        if opts.max_tokens_per_source and total >= opts.max_tokens_per_source:
            break
    stream = np.concatenate(parts)
    if opts.max_tokens_per_source:
        stream = stream[: opts.max_tokens_per_source]
    return stream, n_docs


def prepare(inputs: list[str | Path], out: str | Path, opts: PrepareOptions | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Prepare ``inputs`` into directory ``out``; returns the manifest or raises DataError."""
    opts = opts or PrepareOptions()
    if opts.seq_len < 2:
        raise DataError(out, f"seq_len must be at least 2, got {opts.seq_len}")
    if not 0 <= opts.val_fraction < 1:
        raise DataError(out, f"val_fraction must be in [0, 1), got {opts.val_fraction}")
    out = Path(out)
    files = expand_inputs(inputs)
    tok = load_tokenizer(opts.tokenizer)
    dtype = np.dtype(np.uint16 if len(tok) <= 1 << 16 else np.uint32)
    tmp = out.with_name(f".{out.name}.preparing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = {s: _ShardWriter(tmp, s, dtype, opts.seq_len) for s in ("train", "val")}
        sources = [_write_source(i, path, tok, opts, writers, log)
                   for i, path in enumerate(files)]
        manifest = {
            "format": FORMAT,
            "tokenizer": opts.tokenizer or "bytes",
            "vocab_size": len(tok),
            "eot_id": tok.eos_token_id,
            "seq_len": opts.seq_len,
            "dtype": dtype.name,
            "val_fraction": opts.val_fraction,
            "sources": sources,
            "splits": {s: w.close() for s, w in writers.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_source(i: int, path: Path, tok: PreTrainedTokenizerBase, opts: PrepareOptions,
                  writers: dict[str, _ShardWriter], log: Callable[[str], None]) -> dict:
    """Tokenise source ``i``, write its rows to the train and val shards; its manifest
    entry."""
    stream, n_docs = tokenize_source(path, tok, opts)
    n_rows = len(stream) // opts.seq_len
    if n_rows == 0:
        raise DataError(path, f"only {len(stream)} tokens: fewer than one row "
                        f"of seq_len={opts.seq_len}")
    rows = stream[: n_rows * opts.seq_len].reshape(n_rows, opts.seq_len)
    sha = file_sha256(path)
    is_val = val_mask(n_rows, opts.val_fraction, sha)
    writers["train"].write(rows[~is_val], i)
    writers["val"].write(rows[is_val], i)
    log(f"  {path.name}: {n_docs} documents, {len(stream):,} tokens "
        f"({int((~is_val).sum())} train / {int(is_val.sum())} val rows)")
    return {
        "id": i, "path": str(path.resolve()), "sha256": sha, "bytes": path.stat().st_size,
        "documents": n_docs, "tokens": int(len(stream)),
        "dropped_tokens": int(len(stream) - n_rows * opts.seq_len),
        "train_rows": int((~is_val).sum()), "val_rows": int(is_val.sum()),
        "contributor": opts.contributor,
    }


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames, so ``out`` is always whole, old or new."""
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise DataError(out, "exists and is not a prepared data directory; refusing to replace it")
    replace_directory(tmp, out)
