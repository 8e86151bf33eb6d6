"""Reading prepared token rows: a memory-mapped dataset and a reader with a resumable cursor.

The reader walks a seeded permutation of the rows, one epoch after another. Its cursor
(epoch, position) is part of a site's saved state, so across rounds and restarts a site never
reads a row twice within an epoch and never skips one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from atoll.data.prepare import FORMAT
from atoll.data.shards import SHARD_DTYPES
from atoll.data.sources import DataError


class TokenDataset:
    """One split of a prepared directory as a ``[rows, seq_len]`` view over memmapped shards.

    ``seq_len`` may be any divisor of the prepared row length: each stored row is then read
    as several shorter rows.
    """

    def __init__(self, root: str | Path, split: str = "train", seq_len: int | None = None) -> None:
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        stored = self.manifest["seq_len"]
        self.seq_len = seq_len or stored
        if stored % self.seq_len:
            raise DataError(self.root, f"prepared with seq_len={stored}, which seq_len="
                            f"{self.seq_len} does not divide; prepare again with --seq-len")
        self.split_factor = stored // self.seq_len
        info = self.manifest["splits"][split]
        if self.manifest.get("dtype") not in SHARD_DTYPES:
            raise DataError(self.root / "manifest.json", f"unknown token dtype "
                            f"{self.manifest.get('dtype')!r} (expected one of "
                            f"{', '.join(SHARD_DTYPES)})")
        dtype = np.dtype(self.manifest["dtype"])
        self._shards = []
        for s in info["shards"]:
            path = self.root / s["file"]
            expected = s["rows"] * stored * dtype.itemsize
            if not path.exists() or path.stat().st_size != expected:
                raise DataError(path, f"shard is missing or has the wrong size (expected "
                                f"{expected} bytes): prepare the data again")
            self._shards.append(np.memmap(path, dtype=dtype, mode="r", shape=(s["rows"], stored)))
        self._starts = np.cumsum([0] + [s["rows"] for s in info["shards"]])
        self.stored_rows = int(self._starts[-1])
        if info["shards"] and all("source" in s for s in info["shards"]):  # a pool: one
            # source per shard, so the shard list says where every row came from
            self.row_sources = np.repeat([s["source"] for s in info["shards"]],
                                         [s["rows"] for s in info["shards"]]).astype(np.int32)
        elif not info["shards"]:
            self.row_sources = np.zeros(0, np.int32)
        else:
            self.row_sources = np.load(self.root / f"{split}-sources.npy", mmap_mode="r")
        self.sources = self.manifest["sources"]

    def __len__(self) -> int:
        return self.stored_rows * self.split_factor

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (in units of ``seq_len``) as an int64 array ``[len(index), seq_len]``."""
        stored = index // self.split_factor
        part = index % self.split_factor
        out = np.empty((len(index), self.seq_len), dtype=np.int64)
        shard = np.searchsorted(self._starts, stored, side="right") - 1
        for i, (s, r, p) in enumerate(zip(shard, stored - self._starts[shard], part, strict=True)):
            out[i] = self._shards[s][r, p * self.seq_len : (p + 1) * self.seq_len]
        return out

    def source_of(self, index: np.ndarray) -> np.ndarray:
        """The manifest source index of each of rows ``index`` (for consent and credit)."""
        return np.asarray(self.row_sources)[index // self.split_factor]


def load_manifest(root: Path) -> dict:
    """The ``manifest.json`` of a prepared data directory, or a DataError saying why
    ``root`` is not one."""
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise DataError(root, "not a prepared data directory (no manifest.json): run atoll prepare")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"manifest is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(path, f"unknown format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


class PackedReader:
    """Batches of rows in a seeded order that survives rounds and restarts.

    ``allow`` (optional) filters rows by source index at the moment they are read: a row whose
    source is not allowed is passed over and never yielded. ``yielded`` counts the rows given
    out per source: the reader's own account of whose data was read (consent, credit).
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int = 0,
                 allow: Callable[[int], bool] | None = None) -> None:
        if len(dataset) == 0:
            raise DataError(dataset.root, "the split holds no rows")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.allow = allow
        self.epoch = 0
        self.position = 0
        self.rows_read = 0
        self.yielded: dict[int, int] = {}
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, seq_len]`` batch of token ids (int64)."""
        picked: list[int] = []
        passed_over = 0  # rows refused by `allow` since the last row picked
        while len(picked) < self.batch_size:
            if self.position == len(self._order):
                if passed_over >= len(self._order):
                    raise DataError(self.dataset.root, "no row is allowed to be read")
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            want = self.batch_size - len(picked)
            chunk = self._order[self.position : self.position + want]
            self.position += len(chunk)
            if self.allow is not None:
                ok = allowed_mask(self.dataset.source_of(chunk), self.allow)
                chunk = chunk[ok]
                passed_over = 0 if len(chunk) else passed_over + int((~ok).sum())
            picked.extend(chunk.tolist())
        self.rows_read += self.batch_size
        for src, n in zip(*np.unique(self.dataset.source_of(np.asarray(picked)),
                                     return_counts=True), strict=True):
            self.yielded[int(src)] = self.yielded.get(int(src), 0) + int(n)
        return torch.from_numpy(self.dataset.rows(np.asarray(picked)))

    def state_dict(self) -> dict:
        """Where the reader is (epoch, position, what it yielded per source), to resume from."""
        return {"epoch": self.epoch, "position": self.position, "rows_read": self.rows_read,
                "seed": self.seed, "yielded": {str(k): v for k, v in self.yielded.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`, in the same order it would have read."""
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self.rows_read = state["rows_read"]
        self.yielded = {int(k): v for k, v in state.get("yielded", {}).items()}
        self._order = self._permutation(self.epoch)


def allowed_mask(sources: np.ndarray, allow: Callable[[int], bool]) -> np.ndarray:
    """Which of ``sources`` (row source indices) ``allow`` lets through."""
    sources = np.asarray(sources)
    ok = [int(u) for u in np.unique(sources) if allow(int(u))]
    return np.isin(sources, ok)


def validation_batches(dataset: TokenDataset, batch_size: int, max_batches: int,
                       allow: Callable[[int], bool] | None = None) -> list[torch.Tensor]:
    """A fixed list of validation batches: the first (allowed) rows of the split, in stored
    order."""
    idx = np.arange(len(dataset))
    if allow is not None:
        idx = idx[allowed_mask(dataset.source_of(idx), allow)]
    n = min(len(idx), batch_size * max_batches) if max_batches else len(idx)
    idx = idx[:n]
    return [torch.from_numpy(dataset.rows(idx[i : i + batch_size]))
            for i in range(0, n, batch_size)]
