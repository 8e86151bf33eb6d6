"""Errors shared by light modules (no torch import), so thin processes can raise them."""

from __future__ import annotations


class WireError(ValueError):
    """A message that cannot be decoded: names the reason."""
