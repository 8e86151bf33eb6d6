"""The shape of the tree, kept true by a test: layers, sizes, docstrings.

Dependencies point one way (DESIGN.md): cli -> app -> engines / deploy -> federation ->
train / model / data / consent / ledger / tokenizer -> config -> util. A module may import
from its own layer or any layer below, never above, and no two packages may import each
other (directly or round a longer loop), whether at the top of a file or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "atoll"
LAYERS = [
    ("cli",),
    ("app",),
    ("engines", "deploy", "capacity"),
    ("federation",),
    ("train", "model", "data", "consent", "ledger", "tokenizer", "paths"),
    ("config",),
    ("util",),
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 50


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT.parent)): ast.parse(p.read_text(), filename=str(p))
            for p in sorted(ROOT.rglob("*.py"))}


def _package(path_or_module: str) -> str | None:
    """The top-level part of atoll a file or dotted module belongs to (None: the root)."""
    parts = path_or_module.replace("/", ".").removesuffix(".py").split(".")
    if parts[0] != "atoll" or len(parts) < 2 or parts[1] in ("__init__", "__main__"):
        return None
    return parts[1]


def _imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "atoll" or m.startswith("atoll.")}


def _package_graph() -> tuple[dict[str, set[str]], list[str]]:
    graph: dict[str, set[str]] = {}
    upward = []
    for path, tree in _modules().items():
        src = _package(path)
        if src is None:
            continue
        assert src in RANK, f"{path}: package {src!r} is in no layer of this test"
        for mod in _imports(tree):
            dst = _package(mod)
            if dst is None or dst == src:
                continue
            assert dst in RANK, f"{path} imports {mod}, which is in no layer"
            graph.setdefault(src, set()).add(dst)
            if RANK[dst] < RANK[src]:
                upward.append(f"{path} ({src}) imports {mod} ({dst}, a higher layer)")
    return graph, upward


def test_no_import_goes_up_a_layer():
    _, upward = _package_graph()
    assert upward == []


def test_no_two_packages_import_each_other():
    graph, _ = _package_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            pkg = todo.pop()
            if pkg == goal:
                return True
            if pkg not in seen:
                seen.add(pkg)
                todo.extend(graph.get(pkg, ()))
        return False

    cycles = sorted(f"{a} <-> {b}" for a, deps in graph.items() for b in deps
                    if reaches(b, a))
    assert cycles == []


def test_the_layer_check_catches_an_upward_import():
    """The walker sees imports inside functions too (where a lazy upward one would hide)."""
    tree = ast.parse("def f():\n    from atoll.app.run import Run\n")
    assert _imports(tree) == {"atoll.app.run"}
    assert RANK[_package("atoll.app.run")] < RANK[_package("atoll/federation/site.py")]


def test_files_and_functions_stay_small():
    too_long = []
    for path, tree in _modules().items():
        lines = len((ROOT.parent / path).read_text().splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{path}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path}:{node.lineno} {node.name}: {n} lines")
    assert too_long == []


def _public_defs(tree: ast.Module):
    """Module-level public functions and classes, and the public methods of public classes."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) \
                and not node.name.startswith("_"):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) \
                            and not item.name.startswith("_"):
                        yield f"{node.name}.{item.name}", item


def test_every_public_name_says_what_it_is_for():
    missing = []
    for path, tree in _modules().items():
        if ast.get_docstring(tree) is None:
            missing.append(f"{path}: module docstring")
        for name, node in _public_defs(tree):
            if ast.get_docstring(node) is None:
                missing.append(f"{path}: {name}")
    assert missing == []


def _defined(tree: ast.Module, dotted: str) -> bool:
    """Whether ``name`` or ``Class.method`` is defined at the top of ``tree``."""
    head, _, rest = dotted.partition(".")
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == head:
            if not rest:
                return True
            return any(isinstance(n, ast.FunctionDef) and n.name == rest for n in node.body)
    return False


def test_the_readme_one_round_path_is_true():
    """The README's "One round" list names real functions, in at most 6 files of atoll/."""
    import re

    readme = (ROOT.parent / "README.md").read_text()
    section = readme.split("### One round", 1)[1].split("\nOn Flower", 1)[0]
    pairs = re.findall(r"`([\w/]+\.py)` `([\w.]+)`", section)
    assert len(pairs) >= 6
    trees = _modules()
    for path, name in pairs:
        tree = trees.get(f"atoll/{path}")
        assert tree is not None, f"{path} is not a module of atoll/"
        assert _defined(tree, name), f"{path} defines no {name}"
    assert len({path for path, _ in pairs}) <= 6


def test_the_public_names_resolve():
    """``atoll``'s lazily imported names all point at something real."""
    import atoll

    for name in atoll.__all__:
        assert getattr(atoll, name) is not None, name
