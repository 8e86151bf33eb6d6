"""The router's settings (``[model.paths.router]``): how rows are described and clustered.

Kept apart from :mod:`atoll.paths.router` so that the grid's config can hold them without
importing the clustering code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RouterConfig:
    """How rows are described and clustered (``[model.paths.router]``)."""

    prefix_tokens: int = 128
    """Tokens of a row's beginning that its features describe (a shorter row: all of it)."""
    dim: int = 256
    """Hashed bigram buckets (split evenly between the levels)."""
    sample_rows: int = 256
    """Rows whose features each site sends for fitting."""
    idf: bool = True
    """Weight features by inverse document frequency over the fitting sample."""
    kind: str = "flat"
    """``flat`` (one k-means over the paths) or ``product`` (one per level)."""
    iterations: int = 50
    """Lloyd's iterations of one k-means run, at most."""
    restarts: int = 8
    """k-means runs from successive seeds; the one of least inertia is kept."""
    seed: int = 0

    def check(self) -> None:
        """Refuse settings no router can use."""
        if self.prefix_tokens < 2 or min(self.sample_rows, self.iterations, self.restarts,
                                         self.dim) < 1:
            raise ValueError("model.paths.router: prefix_tokens >= 2; dim, sample_rows, "
                             "iterations and restarts >= 1")
        if self.kind not in ("flat", "product"):
            raise ValueError(f"model.paths.router.kind must be 'flat' or 'product', got "
                             f"{self.kind!r}")
