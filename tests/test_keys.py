"""`atoll keys`: a CA, a server certificate for the coordinator, site key pairs."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from atoll.deploy.keys import add_site_key, make_keys, site_public_keys


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


def test_a_site_makes_its_own_key_and_the_coordinator_holds_only_the_public_half(
        tmp_path, capsys):
    """`atoll keys DIR --site NAME` on the site's machine, `atoll keys DIR --add-site
    NAME.pub` on the coordinator: the coordinator's folder never holds the private key, and
    what the site prints to send holds no private key either."""
    from atoll.cli import main

    site_dir, coord = tmp_path / "at-the-site", tmp_path / "fed-keys"
    assert main(["keys", str(coord), "--hosts", "coord.example.org"]) == 0
    assert main(["keys", str(site_dir), "--site", "hospital"]) == 0
    printed = capsys.readouterr().out
    assert "PRIVATE KEY" not in printed and "ecdsa-sha2-nistp384" in printed
    private = serialization.load_ssh_private_key((site_dir / "hospital").read_bytes(), None)
    assert (site_dir / "hospital").stat().st_mode & 0o077 == 0
    assert main(["keys", str(coord), "--add-site", str(site_dir / "hospital.pub")]) == 0
    assert sorted(site_public_keys(coord)) == ["hospital"]
    held = serialization.load_ssh_public_key(
        " ".join((coord / "sites" / "hospital.pub").read_text().split()[:2]).encode())
    assert held.public_numbers() == private.public_key().public_numbers()
    assert not (coord / "sites" / "hospital").exists()  # no private key at the coordinator
    assert not any("PRIVATE" in p.read_text() for p in (coord / "sites").iterdir())
    # a second, different key under the same name is refused, a junk file too
    other = tmp_path / "other"
    main(["keys", str(other), "--site", "hospital"])
    with pytest.raises(FileExistsError, match="another key"):
        add_site_key(coord, other / "hospital.pub")
    (tmp_path / "junk.pub").write_text("not a key hospital\n")
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        add_site_key(coord, tmp_path / "junk.pub")
