"""Writing without ever leaving a half-written file or directory behind, even on power loss.

Everything atoll writes that a person or a later run relies on (configs, metrics, prepared
data, checkpoints, exported models) is written under a temporary name, flushed to disk
(``fsync``), renamed into place, and the directory holding it is flushed too: a rename alone
is atomic for other processes but not for a crash of the machine, where the new name can be
lost (or point at a file whose bytes never reached the disk) unless both are synced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Flush ``directory``'s entries (names created, renamed or removed in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and every directory of it (a directory about to be
    renamed into place)."""
    for here, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(here) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(here))


def write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that a reader never sees a half-written file and a
    crash leaves either the old or the new file, whole and on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_directory(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing what was there.

    ``tmp``'s files are flushed first. Two renames: at every moment ``final`` is either the
    whole old or the whole new directory (a crash in between leaves the old one beside it as
    ``.NAME.old``)."""
    fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
