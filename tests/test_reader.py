"""The packed reader: seeded order, every row once per epoch, a cursor that survives restarts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atoll.data.prepare import PrepareOptions, prepare
from atoll.data.reader import PackedReader, TokenDataset
from atoll.data.sources import DataError


@pytest.fixture
def dataset(tmp_path):
    for i in range(3):  # counting words: no two rows have the same contents
        (tmp_path / f"doc{i}.txt").write_text(" ".join(f"{i}:{k}" for k in range(400)))
    prepare([tmp_path / f"doc{i}.txt" for i in range(3)], tmp_path / "out",
            PrepareOptions(seq_len=16, val_fraction=0), log=str)
    return TokenDataset(tmp_path / "out", "train")


def row_ids(ds: TokenDataset, batch: torch.Tensor) -> list[int]:
    """Recover which rows a batch holds by matching their contents."""
    table = {tuple(r): i for i, r in enumerate(ds.rows(np.arange(len(ds))).tolist())}
    return [table[tuple(r)] for r in batch.tolist()]


def test_every_row_once_per_epoch(dataset):
    n = len(dataset)
    reader = PackedReader(dataset, batch_size=1, seed=3)
    seen = [row_ids(dataset, reader.next_batch())[0] for _ in range(n)]
    assert sorted(seen) == list(range(n))
    assert reader.epoch == 0 and reader.position == n
    reader.next_batch()
    assert reader.epoch == 1  # the next epoch is a new permutation


def test_resumed_reader_continues_exactly(dataset):
    straight = PackedReader(dataset, batch_size=5, seed=7)
    expected = [straight.next_batch() for _ in range(12)]  # crosses an epoch boundary

    first = PackedReader(dataset, batch_size=5, seed=7)
    got = [first.next_batch() for _ in range(4)]
    state = first.state_dict()
    second = PackedReader(dataset, batch_size=5, seed=0)  # seed comes from the state
    second.load_state_dict(state)
    got += [second.next_batch() for _ in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_allow_filter_never_yields_refused_sources(dataset):
    reader = PackedReader(dataset, batch_size=4, seed=1, allow=lambda s: s != 1)
    ids = [i for _ in range(30) for i in row_ids(dataset, reader.next_batch())]
    assert set(dataset.source_of(np.array(ids)).tolist()) == {0, 2}
    nothing = PackedReader(dataset, batch_size=4, seed=1, allow=lambda s: False)
    with pytest.raises(DataError, match="no row is allowed"):
        nothing.next_batch()


def test_damaged_shard_is_named(dataset):
    shard = dataset.root / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-00000.bin: shard is missing or has the wrong size"):
        TokenDataset(dataset.root, "train")
