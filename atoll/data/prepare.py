"""``atoll prepare``: input files -> packed token shards (numpy memmap) + a manifest.

Layout of a prepared directory::

    manifest.json          sources (path, sha256, tokens, contributor), splits, shards
    train-00000.bin        uint16/uint32 rows of ``seq_len`` tokens (np.memmap)
    train-sources.npy      int32: for each train row, the index of the source it came from
    val-00000.bin, val-sources.npy

Each source file is streamed (a chunk of documents at a time, see :mod:`atoll.data.encode`),
tokenised, its documents joined with end-of-text tokens and packed into rows of ``seq_len``
tokens, stored as uint16 when the vocabulary fits, else uint32. A row never spans two
sources, so consent and credit can be tracked per source; the last partial row of a source is
dropped (counted in the manifest). The validation split takes every k-th block of
``VAL_BLOCK`` rows of each source, starting at an offset derived from the source's hash:
deterministic, an exact fraction, and spread through each source rather than taken from its
end. (So a source's SHA-256 is computed first, in one read of its bytes, before its tokens.)

Everything is written into a temporary directory and renamed into place only when all inputs
were read, so a malformed input never damages an earlier preparation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atoll.data.encode import Encoded, Encoder, chunks
from atoll.data.shards import RowPacker, ShardWriter, ValRule, shard_dtype
from atoll.data.sources import DataError, expand_inputs, read_pieces
from atoll.tokenizer import is_byte_tokenizer, load_tokenizer
from atoll.util.atomic import replace_directory
from atoll.util.hashing import seed_of

FORMAT = "atoll-tokens/1"
VAL_BLOCK = 8  # rows per validation block
# Below this much input, starting worker processes (seconds each: they import transformers)
# costs more than they save (bench/prepare.py).
POOL_MIN_BYTES = 64 << 20


@dataclass
class PrepareOptions:
    """How ``atoll prepare`` turns files into token rows."""

    seq_len: int = 128
    val_fraction: float = 0.05
    text_field: str = "text"
    tokenizer: str = ""  # "" = byte-level
    contributor: str = ""
    max_tokens_per_source: int = 0  # 0 = no limit (used to keep the demo small)
    workers: int = 0
    """Tokenising processes; 0 = min(4, CPUs) for a Hugging Face tokenizer and at least
    ``POOL_MIN_BYTES`` of input, else 1 (the byte-level tokenizer needs no tokenising)."""
    record_paths: bool = True
    """Name each source's file in the manifest; False for a pool's contributions (where a
    contributor's file was is none of the pool's business)."""


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read a MiB at a time: what identifies a source."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def val_rule(val_fraction: float, key: str) -> ValRule | None:
    """Which rows of a source keyed ``key`` go to validation: every k-th block of
    ``VAL_BLOCK`` rows, offset by the key (None: no validation rows)."""
    if val_fraction <= 0:
        return None
    k = max(2, round(1 / val_fraction))
    offset = seed_of(key, hex_digits=64) % k

    def rule(start: int, count: int) -> np.ndarray:
        return (np.arange(start, start + count) // VAL_BLOCK + offset) % k == 0
    return rule


def val_mask(n_rows: int, val_fraction: float, key: str) -> np.ndarray:
    """Which rows of a source go to validation: every k-th block, offset by the source key."""
    rule = val_rule(val_fraction, key)
    if rule is None or n_rows < 2 * VAL_BLOCK:
        return np.zeros(n_rows, dtype=bool)
    return rule(0, n_rows)


def pick_workers(opts: PrepareOptions, byte_level: bool, files: list[Path]) -> int:
    """How many tokenising processes to use (see ``PrepareOptions.workers``)."""
    if opts.workers > 0:
        return opts.workers
    if byte_level or sum(f.stat().st_size for f in files) < POOL_MIN_BYTES:
        return 1
    return min(4, os.cpu_count() or 1)


def prepare(inputs: list[str | Path], out: str | Path, opts: PrepareOptions | None = None,
            log: Callable[[str], None] = print,
            progress: Callable[[str], None] | None = None) -> dict:
    """Prepare ``inputs`` into directory ``out``; returns the manifest or raises DataError.
    ``progress`` (optional) is given a status line after every chunk of work."""
    opts = opts or PrepareOptions()
    if opts.seq_len < 2:
        raise DataError(out, f"seq_len must be at least 2, got {opts.seq_len}")
    if not 0 <= opts.val_fraction < 1:
        raise DataError(out, f"val_fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.workers < 0:
        raise DataError(out, f"workers must be 0 (automatic) or more, got {opts.workers}")
    out = Path(out)
    files = expand_inputs(inputs)
    tok = load_tokenizer(opts.tokenizer)
    dtype = shard_dtype(len(tok))
    meter = _Meter(len(files), progress)
    encoder = Encoder(tok, opts.tokenizer, dtype, pick_workers(opts, is_byte_tokenizer(tok),
                                                               files))
    tmp = out.with_name(f".{out.name}.preparing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = {s: ShardWriter(tmp, s, dtype, opts.seq_len) for s in ("train", "val")}
        sources = [_write_source(i, path, encoder, opts, writers, meter, log)
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
    finally:
        encoder.close()
    log(meter.summary(sources))
    return manifest


class _Meter:
    """Throughput of a preparation: input bytes (whole sources, then the characters of the
    current one) per second since the start."""

    def __init__(self, n_sources: int, progress: Callable[[str], None] | None) -> None:
        self.n_sources, self.progress = n_sources, progress
        self.start = time.perf_counter()
        self.done_bytes = self.tokens = 0

    def chunk(self, i: int, path: Path, chars: int, tokens: int) -> None:
        """Report a chunk of source ``i`` done: ``chars`` of it so far, ``tokens`` more."""
        self.tokens += tokens
        if self.progress is not None:
            mb = (self.done_bytes + chars) / 1e6
            rate = mb / max(time.perf_counter() - self.start, 1e-9)
            self.progress(f"preparing {path.name} ({i + 1}/{self.n_sources}): {mb:,.1f} MB, "
                          f"{self.tokens:,} tokens, {rate:,.1f} MB/s")

    def summary(self, sources: list[dict]) -> str:
        """The closing line: how much, how fast."""
        mb = sum(s["bytes"] for s in sources) / 1e6
        took = time.perf_counter() - self.start
        tokens = sum(s["tokens"] for s in sources)
        noun = "source" if len(sources) == 1 else "sources"
        return (f"prepared {mb:,.1f} MB from {len(sources)} {noun} in {took:,.1f} s "
                f"({mb / max(took, 1e-9):,.1f} MB/s, {tokens:,} tokens)")


def _take(enc: Encoded, in_doc: bool, room: int) -> tuple[np.ndarray, int, bool]:
    """The part of a chunk within ``room`` tokens (``room`` 0: no limit), the documents it
    starts (a piece starts one when the piece before it ended one) and whether the limit was
    reached."""
    starts = np.concatenate([[not in_doc], enc.ends_document[:-1]])
    if not room or enc.ends[-1] < room:
        return enc.tokens, int(starts.sum()), False
    last = int(np.searchsorted(enc.ends, room, side="left"))
    return enc.tokens[:room], int(starts[: last + 1].sum()), True


def _write_source(i: int, path: Path, encoder: Encoder, opts: PrepareOptions,
                  writers: dict[str, ShardWriter], meter: _Meter, log: Callable[[str], None]
                  ) -> dict:
    """Stream source ``i`` into the train and val shards; its manifest entry."""
    sha = file_sha256(path)
    packer = RowPacker(opts.seq_len, i, val_rule(opts.val_fraction, sha), 2 * VAL_BLOCK,
                       writers)
    n_docs = n_tokens = chars = 0
    in_doc = False
    encoded = encoder.encode(chunks(read_pieces(path, opts.text_field)))
    for enc in encoded:
        room = opts.max_tokens_per_source - n_tokens if opts.max_tokens_per_source else 0
        tokens, started, full = _take(enc, in_doc, room)
        packer.add(tokens)
        n_docs, n_tokens, chars = n_docs + started, n_tokens + len(tokens), chars + enc.chars
        in_doc = not enc.ends_document[-1]
        meter.chunk(i, path, chars, len(tokens))
        if full:
            encoded.close()  # stop reading the source
            break
    dropped = packer.finish()
    if packer.rows == 0:
        raise DataError(path, f"only {n_tokens} tokens: fewer than one row "
                        f"of seq_len={opts.seq_len}")
    meter.done_bytes += path.stat().st_size
    train, val = packer.counts["train"], packer.counts["val"]
    log(f"  {path.name}: {n_docs} documents, {n_tokens:,} tokens "
        f"({train} train / {val} val rows)")
    return {
        "id": i, **({"path": str(path.resolve())} if opts.record_paths else {}),
        "sha256": sha, "bytes": path.stat().st_size,
        "documents": n_docs, "tokens": n_tokens, "dropped_tokens": dropped,
        "train_rows": train, "val_rows": val, "contributor": opts.contributor,
    }


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames, so ``out`` is always whole, old or new."""
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise DataError(out, "exists and is not a prepared data directory; refusing to replace it")
    replace_directory(tmp, out)
