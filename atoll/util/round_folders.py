"""Folders named ``round-NNNNN`` under one root, one per saved round, the oldest pruned.

Both the coordinator's checkpoints and a site's saved state are kept this way, so the two
cannot disagree on how a round's folder is named or which ones are kept.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_ROUND_DIR = re.compile(r"^round-(\d{5,})$")


class RoundFolders:
    """The ``round-NNNNN`` folders of ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, round_: int) -> Path:
        """The folder of ``round_`` (whether or not it exists)."""
        return self.root / f"round-{round_:05d}"

    def rounds(self) -> list[int]:
        """The rounds that have a folder, oldest first."""
        if not self.root.exists():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir()
                      if (m := _ROUND_DIR.match(p.name)))

    def prune(self, keep: int, below: int | None = None) -> None:
        """Delete all but the newest ``keep`` folders (with ``below``: only those of rounds
        before it, so that what a repeat of a later round needs stays)."""
        old = self.rounds()[:-keep]
        for r in old if below is None else [r for r in old if r < below]:
            shutil.rmtree(self.path(r), ignore_errors=True)
