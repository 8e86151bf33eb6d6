"""A model of shared modules (DiPaCo: Douillard et al. 2024, arXiv 2403.10616).

The transformer blocks of a Llama-family model are split into *levels* (consecutive ranges
of blocks); each level has several interchangeable *modules* (its own copy of those blocks).
A *path* takes one module per level and is an ordinary causal LM of the base model's shape:
the embeddings, the final norm and the output head are shared by every path. So a site that
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
_LAYER = re.compile(r"model\.layers\.(\d+)\.")

Path = tuple[int, ...]
"""One module index per level."""


@dataclass
class PathsConfig:
    """How a model's blocks are split into levels of modules (``model.paths``)."""

    levels: list[list[int]] = field(default_factory=list)
    """Each level's ``[first, end)`` block range; together they cover every block once, in
    order (``[[0, 2], [2, 4]]`` for a 4-block model in two levels). Empty: a dense model."""
    modules_per_level: list[int] = field(default_factory=list)
    """How many modules each level has (``[2, 2]``: 4 paths)."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """How documents are routed to paths (:mod:`atoll.paths.router`)."""

    @property
    def enabled(self) -> bool:
        """Whether the model is a grid of paths at all."""
        return bool(self.levels)

    def check(self, num_layers: int | None = None) -> None:
        """Refuse levels that do not tile the model's ``num_layers`` blocks (when known), a
        level without modules, or router settings no router can use."""
        if not self.enabled:
            if self.modules_per_level:
                raise ValueError("model.paths.modules_per_level without model.paths.levels")
            return
        self.router.check()
        if len(self.modules_per_level) != len(self.levels):
            raise ValueError(f"model.paths: {len(self.levels)} levels but "
                             f"{len(self.modules_per_level)} entries in modules_per_level")
        at = 0
        for i, lv in enumerate(self.levels):
            if len(lv) != 2 or lv[0] != at or lv[1] <= lv[0]:
                raise ValueError(f"model.paths.levels[{i}] = {lv}: levels must be [first, end) "
                                 f"block ranges that follow each other from block 0")
            at = lv[1]
        if num_layers is not None and at != num_layers:
            raise ValueError(f"model.paths.levels end at block {at}; the model has "
                             f"{num_layers} blocks")
        if any(type(k) is not int or k < 1 for k in self.modules_per_level):
            raise ValueError(f"model.paths.modules_per_level must be integers >= 1, got "
                             f"{self.modules_per_level}")

    def paths(self) -> list[Path]:
        """Every path of the grid, in a fixed order."""
        return list(itertools.product(*(range(k) for k in self.modules_per_level)))

    def modules(self) -> list[str]:
        """Every module's name: ``shared`` first, then level by level."""
        return [SHARED] + [module_name(lv, k) for lv, n in enumerate(self.modules_per_level)
                           for k in range(n)]

    def level_of_block(self, block: int) -> int:
        """The level block ``block`` belongs to."""
        for lv, (first, end) in enumerate(self.levels):
            if first <= block < end:
                return lv
        raise ValueError(f"block {block} is in no level")

    def module_of(self, parameter: str, path: Path) -> str:
        """The module that holds ``parameter`` (a name in the assembled model) on ``path``."""
        m = _LAYER.match(parameter)
        if m is None:
            return SHARED
        lv = self.level_of_block(int(m.group(1)))
        return module_name(lv, path[lv])

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
        m = _LAYER.match(name)
        if m is None:
            grid[f"{SHARED}/{name}"] = t.clone()
            continue
        lv = cfg.level_of_block(int(m.group(1)))
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
