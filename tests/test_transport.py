"""Payloads on Flower: inline or through an object store, checksummed either way."""

from __future__ import annotations

import os

import pytest

from atoll.engines.transport import pack, unpack
from atoll.federation.protocol import WireError


def test_inline_round_trip():
    blob = os.urandom(10_000)
    assert unpack(pack(blob)) == blob


def test_store_round_trip_and_reference_only(tmp_path):
    blob = os.urandom(50_000)
    content = pack(blob, f"file://{tmp_path}", "run/round-00001/site.update")
    assert not content.array_records  # the message carries a reference, not the bytes
    assert (tmp_path / "run" / "round-00001" / "site.update").read_bytes() == blob
    assert unpack(content) == blob


def test_store_checksum_mismatch_is_refused(tmp_path):
    content = pack(b"x" * 1000, f"file://{tmp_path}", "k")
    (tmp_path / "k").write_bytes(b"y" * 1000)  # tampered with (or torn) in the store
    with pytest.raises(WireError, match="checksum mismatch"):
        unpack(content)
    (tmp_path / "k").unlink()
    with pytest.raises(WireError, match="cannot read"):
        unpack(content)


def test_inline_checksum_mismatch_is_refused():
    content = pack(b"abc")
    content.config_records["meta"]["sha256"] = "0" * 64
    with pytest.raises(WireError, match="checksum mismatch"):
        unpack(content)
