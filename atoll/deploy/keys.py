"""``atoll keys``: the certificates and keys of a federation, made with ``cryptography``.

Layout of a keys directory::

    ca.crt, ca.key          the federation's certificate authority (keep ca.key private)
    server.pem, server.key  the coordinator's TLS certificate, valid for the names given
    sites/NAME, NAME.pub    each site's authentication key pair (ECDSA P-384, OpenSSH)

The coordinator needs ``ca.crt``, ``server.*`` and every ``sites/*.pub``; a site needs
``ca.crt`` and its own ``sites/NAME`` (private key). Existing keys are never overwritten, so
running the command again with more ``--sites`` only adds the new ones.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from atoll.util.atomic import write_atomic

VALID_DAYS = 825
LOCAL_NAMES = ["localhost", "127.0.0.1", "::1"]  # the SuperLink also dials itself on loopback


def _private_pem(key: object, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _write_secret(path: Path, payload: bytes) -> None:
    write_atomic(path, payload)
    path.chmod(0o600)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _make_ca(root: Path, now: dt.datetime) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atoll federation CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_secret(root / "ca.key", _private_pem(key, serialization.PrivateFormat.PKCS8))
    write_atomic(root / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))


def _make_server_cert(root: Path, hosts: list[str], now: dt.datetime) -> None:
    ca_key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((root / "ca.crt").read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = list(dict.fromkeys([*hosts, *LOCAL_NAMES]))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_secret(root / "server.key", _private_pem(key, serialization.PrivateFormat.PKCS8))
    write_atomic(root / "server.pem", cert.public_bytes(serialization.Encoding.PEM))


def _make_site_key(folder: Path, site: str) -> Path:
    """``folder/site`` (the private key, 0600) and ``folder/site.pub``; the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_secret(folder / site, _private_pem(key, serialization.PrivateFormat.OpenSSH))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    write_atomic(folder / f"{site}.pub", public + f" {site}\n".encode())
    return folder / f"{site}.pub"


def _check_site_name(site: str) -> None:
    if not site or any(c in site for c in "/\\ \t") or site in (".", ".."):
        raise ValueError(f"site name {site!r} must be non-empty, without spaces or /")


def make_site_key(folder: str | Path, site: str) -> Path:
    """On the site's own machine: its private key ``folder/site`` (kept there, mode 0600)
    and the public key to send to the coordinator's operator; the public key's path."""
    _check_site_name(site)
    folder = Path(folder)
    if (folder / site).exists():
        raise FileExistsError(f"{folder / site} exists: a site keeps the key it registered")
    folder.mkdir(parents=True, exist_ok=True)
    return _make_site_key(folder, site)


def add_site_key(root: str | Path, public_key: str | Path, site: str = "") -> str:
    """On the coordinator: register a site's public key (made by :func:`make_site_key` on
    the site's machine) under ``root/sites``; the site's name (from the key's comment unless
    given). Only the public key is ever held here."""
    text = Path(public_key).read_text().strip()
    parts = text.split()
    try:
        serialization.load_ssh_public_key(" ".join(parts[:2]).encode())
    except (ValueError, IndexError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{public_key}: not an OpenSSH public key (atoll keys --site makes "
                         f"one)") from None
    site = site or (parts[2] if len(parts) > 2 else "")
    _check_site_name(site)
    dest = Path(root) / "sites" / f"{site}.pub"
    if dest.exists() and dest.read_text().split()[:2] != parts[:2]:
        raise FileExistsError(f"{dest} holds another key for site {site!r}; remove it first")
    write_atomic(dest, f"{parts[0]} {parts[1]} {site}\n".encode())
    return site


def make_keys(root: str | Path, sites: list[str], hosts: list[str] | None = None) -> list[str]:
    """Create what is missing under ``root``; returns the paths written."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    written = []
    if not (root / "ca.crt").exists():
        _make_ca(root, now)
        written += ["ca.crt", "ca.key"]
    if not (root / "server.pem").exists() or hosts:
        _make_server_cert(root, hosts or [], now)
        written += ["server.pem", "server.key"]
    for site in sites:
        _check_site_name(site)
        if not (root / "sites" / site).exists():
            _make_site_key(root / "sites", site)
            written += [f"sites/{site}", f"sites/{site}.pub"]
    return written


def site_public_keys(root: str | Path) -> dict[str, Path]:
    """Site name -> public key file, for every site key under ``root``."""
    sites = Path(root) / "sites"
    return {p.stem: p for p in sorted(sites.glob("*.pub"))} if sites.exists() else {}
