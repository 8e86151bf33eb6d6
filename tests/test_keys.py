"""`atoll keys`: a CA, a server certificate for the coordinator, site key pairs."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from atoll.deploy.keys import make_keys, site_public_keys


def test_keys_are_made_once_and_verify(tmp_path):
    written = make_keys(tmp_path, ["a", "b"], hosts=["coord.example.org"])
    assert {"ca.crt", "server.pem", "sites/a", "sites/b.pub"} <= set(written)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coord.example.org" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    key = serialization.load_ssh_private_key((tmp_path / "sites" / "a").read_bytes(), None)
    assert key.curve.name == "secp384r1"
    assert (tmp_path / "sites" / "a").stat().st_mode & 0o077 == 0  # private: owner only

    before = (tmp_path / "sites" / "a").read_bytes()
    assert make_keys(tmp_path, ["a", "c"]) == ["sites/c", "sites/c.pub"]  # adds, keeps
    assert (tmp_path / "sites" / "a").read_bytes() == before
    assert sorted(site_public_keys(tmp_path)) == ["a", "b", "c"]
