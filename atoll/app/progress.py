"""Progress for long work: a live view on a terminal, plain lines everywhere else.

On a terminal, :meth:`Progress.status` redraws the run's live view (:mod:`atoll.app.live`)
in place and lines that stay scroll above it; where output is a file or a pipe (CI, logs)
the same work prints plain lines, the transient ones throttled.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """``update()`` shows transient status; ``log()`` prints a line that stays;
    ``status()`` feeds the live view (a terminal only)."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False,
                 interval_s: float = 10.0, title: str = "atoll",
                 live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if not self.tty else 0.1
        self.title = title
        self._live_wanted = self.tty and not quiet if live is None else live and not quiet
        self._live: Any = None  # rich.live.Live once the first status arrives
        self._tally: Any = None
        self._last = 0.0
        self._shown = False

    def update(self, text: str) -> None:
        """Show ``text`` as the current status: it replaces the last status on a terminal; in
        a log at most one line every ``interval_s``. (The live view, when shown, says more.)"""
        if self.quiet or self._live is not None:
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
        if self._live is not None:
            self._live.console.print(text, highlight=False, markup=False)
            return
        if self._shown:
            self.stream.write("\r\033[K")
            self._shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def status(self, state: dict[str, Any]) -> None:
        """Redraw the live view from a run's status board ``state`` (a terminal only)."""
        if not self._live_wanted:
            return
        from atoll.app.live import Tally, render

        if self._live is None:
            from rich.console import Console
            from rich.live import Live

            if self._shown:
                self.stream.write("\r\033[K")
                self._shown = False
            self._tally = Tally()
            self._live = Live(console=Console(file=self.stream, force_terminal=self.tty or None),
                              refresh_per_second=4, transient=False)
            self._live.start()
        self._live.update(render(state, self._tally, self.title))

    def close(self) -> None:
        """Stop the live view, leaving its last frame on the screen."""
        if self._live is not None:
            self._live.stop()
            self._live = None
