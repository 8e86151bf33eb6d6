"""A progress line for long work: rewritten in place on a terminal, throttled in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``update()`` shows transient status; ``log()`` prints a line that stays."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False,
                 interval_s: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if not self.tty else 0.1
        self._last = 0.0
        self._shown = False

    def update(self, text: str) -> None:
        """Show ``text`` as the current status: it replaces the last status on a terminal; in
        a log at most one line every ``interval_s``."""
        if self.quiet:
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self._shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def log(self, text: str) -> None:
        """Print ``text`` as a line that stays, clearing the status line first."""
        if self.quiet:
            return
        if self._shown:
            self.stream.write("\r\033[K")
            self._shown = False
        self.stream.write(text + "\n")
        self.stream.flush()
