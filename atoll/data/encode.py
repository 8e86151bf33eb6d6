"""Text pieces -> token ids in the shard dtype, a chunk of pieces at a time, on N processes.

Pieces (see :func:`atoll.data.sources.read_pieces`) are grouped into chunks of about
``CHUNK_CHARS`` characters. With one worker a chunk is encoded here; with more, chunks go to a
pool of worker processes (spawned, so it is safe with torch loaded; each loads the tokenizer
once) and their results are taken back in order, so the output does not depend on the number
of workers. At most two chunks per worker are in flight: memory stays bounded however large
the input.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from atoll.tokenizer import is_byte_tokenizer, load_tokenizer

CHUNK_CHARS = 1 << 20  # characters of text per chunk of work
Piece = tuple[str, bool]  # (text, ends_document)


@dataclass
class Encoded:
    """One chunk's tokens: each piece's ids, then end-of-text after a piece that ends a
    document."""

    tokens: np.ndarray
    """All the chunk's token ids, in the shard dtype."""
    ends: np.ndarray
    """For each piece, where its tokens (end-of-text included) end in ``tokens``."""
    ends_document: np.ndarray
    """For each piece, whether it ends a document."""
    chars: int
    """Characters of text in the chunk (for progress)."""


def chunks(pieces: Iterable[Piece], chunk_chars: int = 0) -> Iterator[list[Piece]]:
    """Group ``pieces`` into lists of about ``chunk_chars`` (default ``CHUNK_CHARS``)
    characters."""
    chunk_chars = chunk_chars or CHUNK_CHARS
    chunk, size = [], 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[0])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_chunk(tok: PreTrainedTokenizerBase, chunk: list[Piece], dtype: np.dtype) -> Encoded:
    """Token ids of one chunk of pieces, converted straight into ``dtype`` (never int64)."""
    texts = [text for text, _ in chunk]
    doc_end = np.array([end for _, end in chunk], dtype=bool)
    if is_byte_tokenizer(tok):  # ids are the UTF-8 bytes: no tokenizer call at all
        raw = [t.encode("utf-8") for t in texts]
        lengths = np.array([len(r) for r in raw], dtype=np.int64)
        ids = np.frombuffer(b"".join(raw), dtype=np.uint8).astype(dtype)
    else:
        if tok.is_fast:  # the Rust tokenizer itself; encode_batch_fast skips char offsets
            backend = tok.backend_tokenizer
            batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
            lists = [e.ids for e in batch(texts, add_special_tokens=False)]
        else:
            lists = tok(texts, add_special_tokens=False)["input_ids"]
        lengths = np.array([len(x) for x in lists], dtype=np.int64)
        ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype,
                          count=int(lengths.sum()))
    # end-of-text goes after each piece that ends a document
    tokens = np.insert(ids, np.cumsum(lengths)[doc_end], tok.eos_token_id)
    return Encoded(tokens, np.cumsum(lengths + doc_end), doc_end, sum(map(len, texts)))


_WORKER: tuple[PreTrainedTokenizerBase, np.dtype] | None = None


def _init_worker(tokenizer: str, dtype: str) -> None:
    global _WORKER
    # one thread per worker: the pool is the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (load_tokenizer(tokenizer), np.dtype(dtype))


def _encode_in_worker(chunk: list[Piece]) -> Encoded:
    tok, dtype = _WORKER
    return encode_chunk(tok, chunk, dtype)


class Encoder:
    """Encodes chunks here (``workers <= 1``) or on a pool of ``workers`` processes, which
    is started on first use and ended by :meth:`close`."""

    def __init__(self, tok: PreTrainedTokenizerBase, tokenizer: str, dtype: np.dtype,
                 workers: int = 1) -> None:
        self.tok, self.tokenizer, self.dtype, self.workers = tok, tokenizer, dtype, workers
        self._pool = None

    def encode(self, work: Iterable[list[Piece]]) -> Iterator[Encoded]:
        """The encoded chunks of ``work``, in order."""
        if self.workers <= 1:
            for chunk in work:
                yield encode_chunk(self.tok, chunk, self.dtype)
            return
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers, _init_worker, (self.tokenizer, self.dtype.name))
        pending: deque = deque()
        for chunk in work:
            pending.append(self._pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        """End the worker processes, if any were started."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
