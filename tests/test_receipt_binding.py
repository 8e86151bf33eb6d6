"""A site's receipt key is vouched for by its registered node key, not trusted on first use
(the whole, against real Flower processes, is in tests/test_hostile.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization

from atoll.deploy.keys import make_site_key
from atoll.federation.faults import mangle_header
from atoll.federation.wire_checks import check_fields
from atoll.ledger.receipts import bind_signer, check_binding, check_receipt, sign_receipt
from atoll.ledger.signing import Signer
from atoll.util.errors import WireError
from atoll.util.hashing import tensors_digest


def _pem(pub_path) -> str:
    """The node key as Flower's SuperLink reports it (PEM), from the site's .pub file."""
    key = serialization.load_ssh_public_key(pub_path.read_bytes())
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture
def nodes(tmp_path):
    """Two sites' node key pairs, as `atoll keys --site` makes them: (private, PEM public)."""
    out = {}
    for name in ("alice", "bob"):
        pub = make_site_key(tmp_path, name)
        out[name] = (tmp_path / name, _pem(pub), pub.read_text())
    return out


def test_a_node_key_vouches_for_a_receipt_key(nodes):
    private, pem, openssh = nodes["alice"]
    signer = Signer.generate().public
    binding = bind_signer(private, signer)
    assert check_binding(pem, signer, binding) is None
    assert check_binding(openssh, signer, binding) is None  # either public form
    assert "not the one" in check_binding(nodes["bob"][1], signer, binding)  # another node
    assert "not the one" in check_binding(pem, Signer.generate().public, binding)
    assert "no binding" in check_binding(pem, signer, "")
    assert "not the one" in check_binding(pem, signer, "zz")  # not even hex


def _update(signer: Signer, node_key: str = "", binding: str = "") -> SimpleNamespace:
    receipt = {"run_id": "r", "round": 1, "site": "alice", "purpose": "p", "tokens": 8,
               "contributions": {"c": {"contributor": "x", "sha256": "0", "tokens": 8}},
               "delta": tensors_digest({})}
    return SimpleNamespace(receipt=receipt, receipt_signature=sign_receipt(receipt, signer),
                           signer=signer.public, signer_binding=binding, node_key=node_key,
                           round=1, site="alice", tokens=8, delta={})


def test_with_node_keys_the_binding_decides_and_nothing_is_trusted_on_first_use(nodes):
    private, pem, _ = nodes["alice"]
    s = Signer.generate()
    bound = _update(s, pem, bind_signer(private, s.public))
    assert check_receipt(bound, "r", "p", pinned=None) is None
    # a new receipt key (the site's state folder was rebuilt) is fine once its node vouches
    assert check_receipt(bound, "r", "p", pinned=Signer.generate().public) is None
    # the first receipt of a key nobody vouched for is refused: no trust on first use
    stranger = Signer.generate()
    unbound = _update(stranger, pem, bind_signer(private, s.public))
    assert "not the one" in check_receipt(unbound, "r", "p", pinned=None)
    assert "no binding" in check_receipt(_update(s, pem), "r", "p", pinned=None)
    # without node keys (a simulation), the first key is pinned as before
    assert check_receipt(_update(s), "r", "p", pinned=None) is None
    assert "different key" in check_receipt(_update(stranger), "r", "p", pinned=s.public)


def _head() -> dict:
    return {"v": 1, "type": "SiteUpdate", "run_id": "r", "round": 1, "site": "alice",
            "tokens": 8, "steps": 1, "train_loss": 1.0, "seconds": 1.0,
            "compute_seconds": 1.0, "codec": "fp32", "receipt": {}, "receipt_signature": "",
            "signer": "", "signer_binding": ""}


def test_a_reply_cannot_name_its_own_node_key():
    from atoll.federation.protocol import WIRE_VERSION

    head = _head() | {"v": WIRE_VERSION}
    check_fields(head)
    check_fields(head | {"node_key": ""})
    with pytest.raises(WireError, match="'node_key' is the coordinator's to fill in"):
        check_fields(mangle_header(head, "header_node_key"))


def test_the_node_key_an_engine_fills_in_never_goes_on_the_wire():
    import torch

    from atoll.federation.protocol import SiteUpdate, from_bytes, header, to_bytes

    u = SiteUpdate(run_id="r", round=1, site="alice", delta={"w": torch.ones(2)}, tokens=8,
                   steps=1, train_loss=1.0, seconds=1.0, compute_seconds=1.0,
                   node_key="-----BEGIN PUBLIC KEY-----")
    assert "node_key" not in header(u)
    assert from_bytes(to_bytes(u), SiteUpdate).node_key == ""
