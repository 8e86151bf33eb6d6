"""How a command reports bad input: one line on stderr and a non-zero exit status."""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2


def fail(msg: str) -> int:
    """Print ``error: <msg>`` on stderr; the exit status for bad input, to return."""
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT
