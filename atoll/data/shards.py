"""Token stream -> fixed-length rows -> shard files, a chunk at a time.

:class:`RowPacker` cuts one source's token stream into rows of ``seq_len`` tokens as chunks
of it arrive and sends each row to the train or the validation split; :class:`ShardWriter`
appends rows to ``{split}-NNNNN.bin`` files. Nothing holds more than one chunk of tokens, and
tokens stay in the shard dtype (uint16 or uint32) from the tokenizer's output to the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SHARD_ROWS = 1 << 18  # rows per shard file (32M tokens at seq_len 128)
SHARD_DTYPES = ("uint16", "uint32")

ValRule = Callable[[int, int], np.ndarray]
"""``rule(start, count)``: which of a source's rows ``start .. start+count-1`` are val rows."""


def shard_dtype(vocab_size: int) -> np.dtype:
    """The narrowest shard dtype that holds every token id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class ShardWriter:
    """Appends rows to ``{split}-NNNNN.bin`` files, rolling over every ``SHARD_ROWS`` rows."""

    root: Path
    split: str
    dtype: np.dtype
    seq_len: int
    shards: list[dict] = field(default_factory=list)
    runs: list[tuple[int, int]] = field(default_factory=list)  # (source, rows), in order
    _fh: object | None = None
    _rows_in_shard: int = 0

    def write(self, rows: np.ndarray, source: int) -> None:
        """Append ``rows`` (``[n, seq_len]``) of source ``source``."""
        start = 0
        while start < len(rows):
            if self._fh is None or self._rows_in_shard == SHARD_ROWS:
                self._roll()
            take = min(SHARD_ROWS - self._rows_in_shard, len(rows) - start)
            self._fh.write(rows[start : start + take].astype(self.dtype, copy=False).tobytes())
            self._rows_in_shard += take
            self.shards[-1]["rows"] += take
            start += take
        if len(rows):
            self.runs.append((source, len(rows)))

    def _roll(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = open(self.root / name, "wb")
        self._rows_in_shard = 0
        self.shards.append({"file": name, "rows": 0})

    def close(self) -> dict:
        """Close the last shard, write ``{split}-sources.npy``; the split's manifest entry."""
        if self._fh is not None:
            self._fh.close()
        src = np.repeat(np.array([s for s, _ in self.runs], dtype=np.int32),
                        [n for _, n in self.runs]).astype(np.int32)
        np.save(self.root / f"{self.split}-sources.npy", src)
        return {"rows": int(len(src)), "shards": [s for s in self.shards if s["rows"] > 0]}


class RowPacker:
    """One source's tokens, fed a chunk at a time, written as rows to the train/val writers.

    ``val`` says which rows are validation rows, but only once the source is known to have at
    least ``min_val_rows`` rows (a shorter source is all train): until then its first rows are
    held back, at most ``min_val_rows`` of them.
    """

    def __init__(self, seq_len: int, source: int, val: ValRule | None, min_val_rows: int,
                 writers: dict[str, ShardWriter]) -> None:
        self.seq_len, self.source, self.val, self.min_val_rows = seq_len, source, val, min_val_rows
        self.writers = writers
        self.carry = np.zeros(0, dtype=writers["train"].dtype)
        self.rows = 0  # rows cut so far
        self.counts = {"train": 0, "val": 0}
        self._held: np.ndarray | None = None if val is None else self.carry.reshape(0, seq_len)

    def add(self, tokens: np.ndarray) -> None:
        """Append ``tokens`` to the source's stream; write every row that is now whole."""
        stream = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        n = len(stream) // self.seq_len
        self.carry = stream[n * self.seq_len :].copy()
        rows = stream[: n * self.seq_len].reshape(n, self.seq_len)
        self.rows += n
        if self._held is not None:
            self._held = np.concatenate([self._held, rows])
            if len(self._held) < self.min_val_rows:
                return
            rows, self._held = self._held, None
        self._emit(self.rows - len(rows), rows)

    def _emit(self, start: int, rows: np.ndarray) -> None:
        is_val = self.val(start, len(rows)) if self.val is not None else np.zeros(len(rows), bool)
        for split, pick in (("train", ~is_val), ("val", is_val)):
            chosen = rows[pick]
            self.writers[split].write(chosen, self.source)
            self.counts[split] += len(chosen)

    def finish(self) -> int:
        """Write what is held back (a short source: all train); the tokens dropped (the last
        partial row)."""
        if self._held is not None and len(self._held):
            self.writers["train"].write(self._held, self.source)
            self.counts["train"] += len(self._held)
        self._held = None
        return len(self.carry)
