"""Fragments of a model for streaming sync (Streaming DiLoCo, Douillard et al. 2025,
arXiv 2501.18512).

The parameters are cut, in model order, into ``n`` contiguous groups of about equal size.
Round ``r`` syncs fragment ``(r - 1) % n`` only, so each message carries about ``1/n`` of
the model and the peak bandwidth drops by ``n``, while every fragment is still synced once
every ``n`` rounds.
"""

from __future__ import annotations

import torch


def split_fragments(named: dict[str, torch.Tensor] | dict[str, torch.Size], n: int
                    ) -> list[list[str]]:
    """``n`` contiguous groups of names, each holding about ``1/n`` of the values."""
    sizes = {k: (v.numel() if isinstance(v, torch.Tensor) else int(torch.Size(v).numel()))
             for k, v in named.items()}
    names = list(sizes)
    if n <= 1:
        return [names]
    if n > len(names):
        raise ValueError(f"{n} fragments but only {len(names)} tensors")
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    seen = 0
    for i, name in enumerate(names):
        remaining_names = len(names) - i
        remaining_groups = n - len(groups)
        # close the group once it reaches its share, keeping one tensor per later group
        if groups[-1] and (seen >= total * len(groups) / n or remaining_names <= remaining_groups):
            if len(groups) < n:
                groups.append([])
        groups[-1].append(name)
        seen += sizes[name]
    return groups


def fragment_of_round(round_: int, n: int) -> int:
    """Which fragment round ``round_`` (1-based) syncs."""
    return (round_ - 1) % max(1, n)
