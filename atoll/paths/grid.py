"""A model of shared modules (DiPaCo: Douillard et al. 2024, arXiv 2403.10616).

The transformer blocks of a Llama-family model are split into *levels* (consecutive ranges
of blocks); each level has several interchangeable *modules* (its own copy of those blocks).
A *path* takes one module per level and is an ordinary causal LM of the base model's shape:
the embeddings, the final norm and the output head are shared by every path, unless the
token embeddings (``"embed"``, the first level) or the final norm and output head
(``"head"``, the last level) are made a level of their own. So a site that
trains one path holds and trains exactly one base model, and the whole grid (``K^L`` paths
from ``K x L`` modules) is larger than anything one site holds.

The grid's weights are one flat dict keyed ``"<module>/<parameter>"``, where ``<module>`` is
``shared`` or ``l<level>m<k>`` and ``<parameter>`` is the name in the assembled path model:
the outer optimizer steps it like any other dict of tensors, and a module no update touched
in a round (no site trained a path through it) is left alone, momentum included.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import torch

from atoll.paths.router_config import RouterConfig

SHARED = "shared"
EMBED = "embed"
HEAD = "head"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Llama-family names of what is outside the blocks: a level "embed" holds the first, "head"
# the second (the final norm goes with the head: it only ever feeds it).
_OUTSIDE = {EMBED: ("model.embed_tokens.",), HEAD: ("model.norm.", "lm_head.")}

Path = tuple[int, ...]
"""One module index per level."""


@dataclass
class PathsConfig:
    """How a model's blocks are split into levels of modules (``model.paths``)."""

    levels: list[list[int] | str] = field(default_factory=list)
    """Each level's ``[first, end)`` block range; together they cover every block once, in
    order (``[[0, 2], [2, 4]]`` for a 4-block model in two levels). ``"embed"`` first and
    ``"head"`` last make the token embeddings, and the final norm with the output head,
    levels of their own (``["embed", [0, 4]]``). Empty: a dense model."""
    modules_per_level: list[int] = field(default_factory=list)
    """How many modules each level has (``[2, 2]``: 4 paths)."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """How documents are routed to paths (:mod:`atoll.paths.router`)."""
    sites_per_path: int = 0
    """At most this many sites train one path in a round (0 = no cap): where more drew it,
    a seeded sample of this many does and the others sit the round out."""

    @property
    def enabled(self) -> bool:
        """Whether the model is a grid of paths at all."""
        return bool(self.levels)

    def check(self, num_layers: int | None = None, tied: bool = False) -> None:
        """Refuse levels that do not tile the model's ``num_layers`` blocks (when known), a
        level without modules, ``"embed"`` or ``"head"`` out of place or on a model that
        ties its input and output embeddings (``tied``), or router settings no router can
        use."""
        if not self.enabled:
            if self.modules_per_level:
                raise ValueError("model.paths.modules_per_level without model.paths.levels")
            return
        self.router.check()
        if len(self.modules_per_level) != len(self.levels):
            raise ValueError(f"model.paths: {len(self.levels)} levels but "
                             f"{len(self.modules_per_level)} entries in modules_per_level")
        self._check_outside(tied)
        at = 0
        for i, lv in enumerate(self.levels):
            if isinstance(lv, str):
                continue
            if len(lv) != 2 or lv[0] != at or lv[1] <= lv[0]:
                raise ValueError(f"model.paths.levels[{i}] = {lv}: levels must be [first, end) "
                                 f"block ranges that follow each other from block 0")
            at = lv[1]
        if at == 0:
            raise ValueError("model.paths.levels has no block range: the blocks need at "
                             "least one level (one module of [0, blocks) is the dense stack)")
        if num_layers is not None and at != num_layers:
            raise ValueError(f"model.paths.levels end at block {at}; the model has "
                             f"{num_layers} blocks")
        if self.sites_per_path < 0:
            raise ValueError(f"model.paths.sites_per_path must be >= 0, got "
                             f"{self.sites_per_path}")
        if any(type(k) is not int or k < 1 for k in self.modules_per_level):
            raise ValueError(f"model.paths.modules_per_level must be integers >= 1, got "
                             f"{self.modules_per_level}")

    def _check_outside(self, tied: bool) -> None:
        """``"embed"`` only first, ``"head"`` only last, no other names, and neither where
        one tensor is both (a path would get another path's head with its embeddings)."""
        last = len(self.levels) - 1
        for i, lv in enumerate(self.levels):
            if not isinstance(lv, str):
                continue
            if lv not in _OUTSIDE or (lv == EMBED and i != 0) or (lv == HEAD and i != last):
                raise ValueError(f"model.paths.levels[{i}] = {lv!r}: a named level is "
                                 f"\"embed\" (first) or \"head\" (last)")
            if tied:
                raise ValueError(f"model.paths.levels[{i}] = {lv!r}: the model ties its input "
                                 f"and output embeddings (tie_word_embeddings), so neither "
                                 f"can be a level of its own")

    def paths(self) -> list[Path]:
        """Every path of the grid, in a fixed order."""
        return list(itertools.product(*(range(k) for k in self.modules_per_level)))

    def modules(self) -> list[str]:
        """Every module's name: ``shared`` first, then level by level."""
        return [SHARED] + [module_name(lv, k) for lv, n in enumerate(self.modules_per_level)
                           for k in range(n)]

    def level_of_block(self, block: int) -> int:
        """The level block ``block`` belongs to."""
        for lv, span in enumerate(self.levels):
            if not isinstance(span, str) and span[0] <= block < span[1]:
                return lv
        raise ValueError(f"block {block} is in no level")

    def level_of(self, parameter: str) -> int | None:
        """The level ``parameter`` (a name in the assembled model) belongs to; None: it is
        shared by every path."""
        m = _LAYER.match(parameter)
        if m is not None:
            return self.level_of_block(int(m.group(1)))
        for named, prefixes in _OUTSIDE.items():
            if named in self.levels and parameter.startswith(prefixes):
                return self.levels.index(named)
        return None

    def module_of(self, parameter: str, path: Path) -> str:
        """The module that holds ``parameter`` (a name in the assembled model) on ``path``."""
        lv = self.level_of(parameter)
        return SHARED if lv is None else module_name(lv, path[lv])

    def modules_of(self, path: Path) -> list[str]:
        """The modules ``path`` runs through (``shared`` included)."""
        return [SHARED] + [module_name(lv, k) for lv, k in enumerate(path)]


def module_name(level: int, k: int) -> str:
    """The name of module ``k`` of ``level``."""
    return f"l{level}m{k}"


def path_name(path: Path) -> str:
    """A path as text (``p0-1``), for plans, folders and logs."""
    return "p" + "-".join(map(str, path))


def parse_path(name: str, cfg: PathsConfig) -> Path:
    """The path named ``name``; ValueError for one that is not in the grid."""
    try:
        path = tuple(int(x) for x in name.removeprefix("p").split("-"))
    except ValueError:
        raise ValueError(f"{name!r:.40} is not a path name") from None
    if not name.startswith("p") or path not in set(cfg.paths()):
        raise ValueError(f"{name!r:.40} is not a path of this grid")
    return path


def grid_from_dense(dense: dict[str, torch.Tensor], cfg: PathsConfig
                    ) -> dict[str, torch.Tensor]:
    """The grid's initial weights: every module of a level starts as a copy of the dense
    model's blocks of that level (the paths then differ by the data routed to them)."""
    grid = {}
    for name, t in dense.items():
        lv = cfg.level_of(name)
        if lv is None:
            grid[f"{SHARED}/{name}"] = t.clone()
            continue
        for k in range(cfg.modules_per_level[lv]):
            grid[f"{module_name(lv, k)}/{name}"] = t.clone()
    return grid


def path_weights(grid: dict[str, torch.Tensor], path: Path, cfg: PathsConfig
                 ) -> dict[str, torch.Tensor]:
    """The weights of ``path`` as one model (named as the base model's): what a site that
    trains it receives. Tensors are the grid's own, not copies."""
    wanted = set(cfg.modules_of(path))
    out = {}
    for key, t in grid.items():
        module, _, name = key.partition("/")
        if module in wanted and cfg.module_of(name, path) == module:
            out[name] = t
    return out


def to_grid(delta: dict[str, torch.Tensor], path: Path, cfg: PathsConfig
            ) -> dict[str, torch.Tensor]:
    """A path's tensors (named as the base model's) under their grid keys."""
    return {f"{cfg.module_of(name, path)}/{name}": t for name, t in delta.items()}
