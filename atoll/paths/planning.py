"""Which path each site trains in a round.

A site trains one path a round, drawn in proportion to its (consented) tokens on each path:
over the rounds it trains every path its data routes to, each as often as its share of the
data, and a path it holds nothing of is never its to train. The draw is seeded by the run's
seed, the round and the site's name (not its place among the others: a site that joins
changes nobody else's draws), so a resumed run draws what the uninterrupted one did.
With ``sites_per_path``, a path more sites drew keeps a sample of them, seeded by the run's
seed, the round and the path.
"""

from __future__ import annotations

import numpy as np

from atoll.paths.grid import Path, path_name
from atoll.util.hashing import seed_of


def assign_paths(tokens: dict[str, dict[Path, int]], round_: int, seed: int
                 ) -> dict[str, Path]:
    """Each site's path for ``round_``; sites with no tokens on any path get none."""
    out = {}
    for site in sorted(tokens):
        held = sorted((p, n) for p, n in tokens[site].items() if n > 0)
        if not held:
            continue
        weights = np.array([n for _, n in held], dtype=np.float64)
        rng = np.random.default_rng([seed, round_, seed_of(seed, site)])
        out[site] = held[int(rng.choice(len(held), p=weights / weights.sum()))][0]
    return out


def sites_of(assigned: dict[str, Path], path: Path) -> list[str]:
    """The sites training ``path`` this round."""
    return sorted(s for s, p in assigned.items() if p == path)


def cap_sites(assigned: dict[str, Path], cap: int, round_: int, seed: int
              ) -> dict[str, Path]:
    """``assigned`` with at most ``cap`` sites on each path (0: all of them); which ones
    stay is drawn per path, so a path's sample does not depend on the other paths'."""
    if cap <= 0:
        return dict(assigned)
    out = {}
    for path in sorted(set(assigned.values())):
        sites = sites_of(assigned, path)
        if len(sites) > cap:
            rng = np.random.default_rng([seed, round_, seed_of(seed, path_name(path))])
            sites = rng.choice(sites, size=cap, replace=False).tolist()
        out.update({s: path for s in sites})
    return dict(sorted(out.items()))
