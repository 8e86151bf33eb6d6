"""Input files -> documents, with one clear error naming the file when an input is malformed.

Three formats: plain text (one document per file), JSON Lines (one document per line, from a
text field) and Parquet (one document per row, from a text column). Formats are told apart by
extension; everything that is not ``.jsonl``/``.parquet`` is read as UTF-8 text.

:func:`read_pieces` streams: a JSON line or Parquet row is one piece, and a plain text file
is read ``PIECE_BYTES`` at a time and cut after its last line break, so no file is ever held
whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
PIECE_BYTES = 1 << 20  # how much of a plain text file is read at a time


class DataError(ValueError):
    """A malformed input file: ``str(err)`` is one line naming the file and what is wrong."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files named directly, plus every regular file under named directories, in sorted order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise DataError(p, "directory holds no files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(p, "no such file or directory")
    return files


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one input file, raising :class:`DataError` on malformed input."""
    parts: list[str] = []
    for text, ends_document in read_pieces(path, text_field):
        parts.append(text)
        if ends_document:
            yield "".join(parts)
            parts = []


def read_pieces(path: Path, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """Yield one input file as ``(text, ends_document)`` pieces, in bounded memory, raising
    :class:`DataError` on malformed input (possibly after some pieces were yielded)."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    if suffix in PARQUET_SUFFIXES:
        yield from ((doc, True) for doc in _parquet_documents(path, text_field))
    elif suffix in JSONL_SUFFIXES:
        yield from ((doc, True) for doc in _jsonl_documents(path, text_field))
    else:
        last = None  # one piece of look-ahead: only the last piece ends the document
        for piece in _text_pieces(path):
            if last is not None:
                yield last, False
            last = piece
        if last is not None:
            yield last, True


def _text_pieces(path: Path) -> Iterator[str]:
    """A plain text file in pieces of about ``PIECE_BYTES``, each cut after a line break
    (or, in a line longer than that, between two characters)."""
    seen_text, base, carry = False, 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(PIECE_BYTES)
            buf = carry + block
            if not buf:
                break
            cut = _cut(buf) if block else len(buf)
            head, carry = buf[:cut], buf[cut:]
            if head:
                text = _decode(path, head, base=base)
                base += cut
                seen_text = seen_text or bool(text.strip())
                yield text
    if not seen_text:
        raise DataError(path, "file holds only whitespace")


def _cut(buf: bytes) -> int:
    """Where to end a piece of ``buf``: after its last line break, else before a UTF-8
    character that the buffer holds only the start of (the rest follows in the next read)."""
    newline = buf.rfind(b"\n")
    if newline >= 0:
        return newline + 1
    for back in range(1, min(4, len(buf)) + 1):
        b = buf[-back]
        if b & 0xC0 != 0x80:  # not a continuation byte: an ASCII or a lead byte
            need = 1 if b < 0x80 else 2 if b >> 5 == 6 else 3 if b >> 4 == 14 else 4
            return len(buf) if back >= need else len(buf) - back
    return len(buf)


def _decode(path: Path, raw: bytes, where: str = "", base: int = 0) -> str:
    """Strict UTF-8 decoding that tells binary files apart from merely mis-encoded text
    (``base``: the offset of ``raw`` in the file, for the message)."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(path, f"{where}looks binary, not text (NUL byte at offset "
                        f"{base + nul})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"{where}invalid UTF-8 at byte {base + e.start} "
                        f"({e.reason})") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    n_docs = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(path, raw, f"line {lineno}: ")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(path, f"line {lineno}: expected a JSON object")
            if field not in record:
                keys = ", ".join(sorted(record)) or "none"
                raise DataError(path, f"line {lineno}: no '{field}' field (fields: {keys})")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(path, f"line {lineno}: field '{field}' is not a string")
            if text:
                n_docs += 1
                yield text
    if n_docs == 0:
        raise DataError(path, f"no non-empty '{field}' values")


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, f"not a readable Parquet file (truncated or corrupt?): {e}") from None
    if column not in names:
        raise DataError(path, f"no column '{column}' (columns: {', '.join(names) or 'none'})")
    if not pa.types.is_string(pf.schema_arrow.field(column).type) and not pa.types.is_large_string(
        pf.schema_arrow.field(column).type
    ):
        raise DataError(path, f"column '{column}' is not a string column")
    n_docs = 0
    try:
        for batch in pf.iter_batches(columns=[column], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text:
                    n_docs += 1
                    yield text
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, f"Parquet data is unreadable (truncated or corrupt?): {e}") from None
    if n_docs == 0:
        raise DataError(path, f"no non-empty '{column}' values")
