"""Input files -> documents, with one clear error naming the file when an input is malformed.

Three formats: plain text (one document per file), JSON Lines (one document per line, from a
text field) and Parquet (one document per row, from a text column). Formats are told apart by
extension; everything that is not ``.jsonl``/``.parquet`` is read as UTF-8 text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}


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
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    if suffix in PARQUET_SUFFIXES:
        yield from _parquet_documents(path, text_field)
    elif suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, text_field)
    else:
        text = _decode(path, path.read_bytes())
        if not text.strip():
            raise DataError(path, "file holds only whitespace")
        yield text


def _decode(path: Path, raw: bytes, where: str = "") -> str:
    """Strict UTF-8 decoding that tells binary files apart from merely mis-encoded text."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(path, f"{where}looks binary, not text (NUL byte at offset {nul})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"{where}invalid UTF-8 at byte {e.start} ({e.reason})") from None


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
