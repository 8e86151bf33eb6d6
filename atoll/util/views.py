"""Read-only views of a mapping of tensors: the same values under other keys, or some of
them. Nothing is read from the mapping underneath until a view's value is asked for, so a
lazily decoded update (:class:`~atoll.federation.codecs.Decoded`) stays one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch


class Renamed(Mapping[str, torch.Tensor]):
    """``inner`` with each key ``k`` of ``names`` read as ``names[k]``."""

    def __init__(self, inner: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> None:
        self.inner = inner
        self._new = dict(names)
        self._old = {new: old for old, new in names.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.inner[self._old.get(key, key)]

    def __iter__(self) -> Iterator[str]:  # keys of inner that names does not cover stay as
        return (self._new.get(k, k) for k in self.inner)  # they are: a check sees them

    def __len__(self) -> int:
        return len(self.inner)


class Subset(Mapping[str, torch.Tensor]):
    """The ``keys`` of ``whole`` only."""

    def __init__(self, whole: Mapping[str, torch.Tensor], keys: list[str]) -> None:
        self.whole = whole
        self._keys = dict.fromkeys(keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self.whole[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
