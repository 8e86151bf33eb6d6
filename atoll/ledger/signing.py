"""Ed25519 keys for the ledger: the coordinator signs every entry, a site signs its reports.

A key lives in one file (raw 32-byte private key, hex, mode 0600) and is made on first use;
its public half is written beside it as ``NAME.pub`` for anyone who wants to check a ledger
against a key they got another way than from the ledger itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from atoll.util.atomic import write_atomic


class Signer:
    """A private Ed25519 key that signs bytes; ``public`` is its public key in hex."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = key.public_key().public_bytes_raw().hex()

    @classmethod
    def generate(cls) -> Signer:
        """A new random key (not saved: :meth:`load_or_create` keeps one on disk)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike,
                       public_copy: str | os.PathLike | None = None) -> Signer:
        """The key in ``path``; a new one is made (and ``path.pub`` written) if none exists.
        ``public_copy``: also keep the public key there (e.g. beside what the key signs)."""
        path = Path(path)
        if path.exists():
            try:
                signer = cls(Ed25519PrivateKey.from_private_bytes(
                    bytes.fromhex(path.read_text().strip())))
            except ValueError:
                raise ValueError(f"{path}: not an atoll signing key (64 hex digits)") from None
        else:
            signer = cls.generate()
            raw = signer._key.private_bytes_raw().hex().encode()
            write_atomic(path, raw + b"\n")
            path.chmod(0o600)
            write_atomic(path.with_name(path.name + ".pub"), signer.public.encode() + b"\n")
        if public_copy is not None:
            write_atomic(Path(public_copy), signer.public.encode() + b"\n")
        return signer

    def sign(self, data: bytes) -> str:
        """The Ed25519 signature of ``data``, in hex."""
        return self._key.sign(data).hex()


def verify(public_hex: str, data: bytes, signature_hex: str) -> bool:
    """Whether ``signature_hex`` is ``public_hex``'s signature of ``data``."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        key.verify(bytes.fromhex(signature_hex), data)
    except (ValueError, InvalidSignature):
        return False
    return True
