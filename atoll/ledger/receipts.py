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

import functools
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

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


def _binding_text(signer: str) -> bytes:
    return f"atoll receipt signer v1: {signer}".encode()


@functools.lru_cache(maxsize=8)
def bind_signer(node_key: str | Path, signer: str) -> str:
    """The site's node key (its OpenSSH private key file) vouching for ``signer``: an ECDSA
    signature, hex (made once per key pair: a site sends it with every update)."""
    key = serialization.load_ssh_private_key(Path(node_key).read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{node_key}: not an ECDSA key (atoll keys makes one)")
    return key.sign(_binding_text(signer), ec.ECDSA(hashes.SHA256())).hex()


def check_binding(node_key: str, signer: str, binding: str) -> str | None:
    """Why ``binding`` does not show the node key ``node_key`` (PEM or OpenSSH public key,
    as the node authenticated with) vouching for the receipt key ``signer``, or None."""
    if not binding:
        return "receipt key not vouched for by the site's node key (no binding)"
    try:
        text = node_key.encode()
        public = (serialization.load_pem_public_key(text) if text.startswith(b"-----")
                  else serialization.load_ssh_public_key(text))
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return "the node's key is not an ECDSA key"
        public.verify(bytes.fromhex(binding), _binding_text(signer), ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature):
        return "receipt key is not the one the site's registered node key vouches for"
    return None


def check_receipt(update: Any, run_id: str, purpose: str, pinned: str | None
                 ) -> str | None:
    """Why ``update``'s receipt cannot be accepted, or None. The receipt key must be
    vouched for by the sender's node key (``update.node_key``, filled in by the engine) or,
    with no node keys, be ``pinned``: the key this site signed with earlier in the run."""
    r = update.receipt
    if not r or not update.signer:
        return "no signed contribution receipt"
    if update.node_key:
        why = check_binding(update.node_key, update.signer, update.signer_binding)
        if why is not None:
            return why
    elif pinned is not None and update.signer != pinned:
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
