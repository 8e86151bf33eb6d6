"""What a site says about its own update, signed with its own key.

A receipt names, for one round, every contribution the site's reader yielded rows from and how
many tokens each gave, and binds itself to the update with the SHA-256 of the encoded delta::

    {"run_id", "round", "site", "purpose", "tokens", "delta": sha256,
     "contributions": {id: {"contributor", "sha256", "tokens"}}}

Contribution ids and content hashes only: no text ever leaves the site in a receipt. The
coordinator checks the signature, that the key is the one this site used before in the run
(the first key a site signs with is pinned in the ledger), and that the numbers agree with
the update, before the update may count.
"""

from __future__ import annotations

from typing import Any

from atoll.ledger.chain import canonical
from atoll.ledger.signing import Signer, verify
from atoll.util.hashing import tensors_digest


def build_receipt(*, run_id: str, round_: int, site: str, purpose: str,
                 rows_by_source: dict[int, int], sources: list[dict[str, Any]], seq_len: int,
                 delta: dict) -> dict[str, Any]:
    """The receipt of ``rows_by_source`` (rows of ``seq_len`` tokens read per source)."""
    contributions: dict[str, dict[str, Any]] = {}
    for src, rows in sorted(rows_by_source.items()):
        if rows <= 0:
            continue
        info = sources[src]
        # a pool's sources are contributions; plain prepared data is the site's own, keyed
        # by content hash and credited to its contributor tag (or the site)
        key = info.get("contribution") or info["sha256"][:16]
        entry = contributions.setdefault(key, {"contributor": info.get("contributor") or site,
                                               "sha256": info["sha256"], "tokens": 0})
        entry["tokens"] += rows * seq_len
    return {"run_id": run_id, "round": round_, "site": site, "purpose": purpose,
            "tokens": sum(c["tokens"] for c in contributions.values()),
            "contributions": contributions, "delta": tensors_digest(delta)}


def sign_receipt(receipt: dict[str, Any], signer: Signer) -> str:
    """The site's signature (hex) over the canonical text of ``receipt``."""
    return signer.sign(canonical(receipt).encode())


def check_receipt(update: Any, run_id: str, purpose: str, pinned: str | None
                 ) -> str | None:
    """Why ``update``'s receipt cannot be accepted, or None. ``pinned``: the key this site
    signed with earlier in the run, if any."""
    r = update.receipt
    if not r or not update.signer:
        return "no signed contribution receipt"
    if pinned is not None and update.signer != pinned:
        return "receipt signed with a different key than this site used before"
    if not verify(update.signer, canonical(r).encode(), update.receipt_signature):
        return "bad signature on the contribution receipt"
    expect = {"run_id": run_id, "round": update.round, "site": update.site, "purpose": purpose}
    for k, v in expect.items():
        if r.get(k) != v:
            return f"contribution receipt: {k} is {r.get(k)!r}, expected {v!r}"
    try:
        total = sum(int(c["tokens"]) for c in r["contributions"].values())
    except (KeyError, TypeError, ValueError, AttributeError):
        return "contribution receipt: malformed contributions"
    if total != r.get("tokens") or total != update.tokens:
        return (f"contribution receipt accounts for {total} tokens, the update for "
                f"{update.tokens}")
    if r.get("delta") != tensors_digest(update.delta):
        return "contribution receipt is for a different update (delta hash differs)"
    return None
