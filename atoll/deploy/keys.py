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


def _make_site_key(root: Path, site: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    sites = root / "sites"
    _write_secret(sites / site, _private_pem(key, serialization.PrivateFormat.OpenSSH))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    write_atomic(sites / f"{site}.pub", public + f" {site}\n".encode())


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
        if not site or any(c in site for c in "/\\ \t"):
            raise ValueError(f"site name {site!r} must be non-empty, without spaces or /")
        if not (root / "sites" / site).exists():
            _make_site_key(root, site)
            written += [f"sites/{site}", f"sites/{site}.pub"]
    return written


def site_public_keys(root: str | Path) -> dict[str, Path]:
    """Site name -> public key file, for every site key under ``root``."""
    sites = Path(root) / "sites"
    return {p.stem: p for p in sorted(sites.glob("*.pub"))} if sites.exists() else {}
