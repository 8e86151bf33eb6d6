"""pyproject.toml is honest about the Python atoll needs, the way CI installs it.

CI runs ``make setup`` (a venv and ``pip install -e .[dev]``), and pip refuses a Python below
``requires-python``; so that bound must be at least the oldest Python that has every part of
the standard library atoll uses, and ruff must lint for that same Python (its UP rules would
otherwise suggest what the oldest supported Python lacks, or miss what it has).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NEEDS = {
    "tomllib": (3, 11),
    "datetime.UTC": (3, 11),
    "enum.StrEnum": (3, 11),
    "typing.Self": (3, 11),
    "asyncio.TaskGroup": (3, 11),
    "asyncio.timeout": (3, 11),
    "typing.override": (3, 12),
    "itertools.batched": (3, 12),
    "zoneinfo": (3, 9),
    "graphlib": (3, 9),
}
"""Standard-library modules and names with the Python that first has them (the ones known
here; a use of any other is taken to be old enough)."""


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _minimum_python() -> tuple[int, int]:
    spec = _pyproject()["project"]["requires-python"]
    found = re.search(r">=\s*(\d+)\.(\d+)", spec)
    assert found, f"requires-python {spec!r} has no lower bound >=X.Y"
    return int(found[1]), int(found[2])


def _stdlib_uses(tree: ast.Module) -> set[str]:
    """``module`` and ``module.name`` for every import of the module and every name taken
    from it (``from m import n`` or ``m.n`` through ``import m [as a]``)."""
    uses, aliases = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                uses.add(a.name)
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            uses.add(node.module)
            uses.update(f"{node.module}.{a.name}" for a in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases:
            uses.add(f"{aliases[node.value.id]}.{node.attr}")
    return uses


def _needed_python() -> tuple[tuple[int, int], list[str]]:
    """The oldest Python that has every known-versioned stdlib part atoll uses, and why."""
    need, why = (3, 0), []
    for path in sorted((ROOT / "atoll").rglob("*.py")):
        for use in _stdlib_uses(ast.parse(path.read_text(), filename=str(path))):
            if use in NEEDS:
                need = max(need, NEEDS[use])
                version = ".".join(map(str, NEEDS[use]))
                why.append(f"{path.relative_to(ROOT)}: {use} (Python {version})")
    return need, why


def test_requires_python_covers_the_stdlib_atoll_imports():
    need, why = _needed_python()
    assert _minimum_python() >= need, "requires-python is below what atoll uses:\n" + \
        "\n".join(why)


def test_tomllib_is_among_what_is_found():
    """The walker sees the config loader's tomllib, so the check above is not empty."""
    need, why = _needed_python()
    assert need >= (3, 11)
    assert any(w.startswith("atoll/config.py: tomllib") for w in why)


def test_aliased_attribute_uses_are_found():
    tree = ast.parse("import datetime as dt\nnow = dt.datetime.now(dt.UTC)\n")
    assert "datetime.UTC" in _stdlib_uses(tree)


def test_ruff_lints_for_the_oldest_supported_python():
    major, minor = _minimum_python()
    assert _pyproject()["tool"]["ruff"]["target-version"] == f"py{major}{minor}"


def test_this_python_is_supported():
    assert sys.version_info[:2] >= _minimum_python()
