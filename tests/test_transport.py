"""Payloads on Flower: inline or through an object store, checksummed either way; a
reference is read only from the one folder the receiver expects, capped and timed."""

from __future__ import annotations

import os

import pytest

from atoll.engines.flower import FlowerEngine
from atoll.engines.transport import object_folder, pack, unpack
from atoll.federation.protocol import WireError


def test_inline_round_trip():
    blob = os.urandom(10_000)
    assert unpack(pack(blob)) == blob


def test_store_round_trip_and_reference_only(tmp_path):
    blob = os.urandom(50_000)
    folder = object_folder(f"file://{tmp_path}", "run", "alice", "round", 1)
    content = pack(blob, folder, "update")
    assert not content.array_records  # the message carries a reference, not the bytes
    assert (tmp_path / "run" / "sites" / "alice" / "round-00001" / "update").read_bytes() == blob
    assert unpack(content, folder) == blob


def test_store_checksum_mismatch_is_refused(tmp_path):
    folder = object_folder(f"file://{tmp_path}", "run", "coordinator", "round", 1)
    content = pack(b"x" * 1000, folder, "k")
    path = tmp_path / "run" / "coordinator" / "round-00001" / "k"
    path.write_bytes(b"y" * 1000)  # tampered with (or torn) in the store
    with pytest.raises(WireError, match="checksum mismatch"):
        unpack(content, folder)
    path.unlink()
    with pytest.raises(WireError, match="cannot read"):
        unpack(content, folder)


def test_inline_checksum_mismatch_is_refused():
    content = pack(b"abc")
    content.config_records["meta"]["sha256"] = "0" * 64
    with pytest.raises(WireError, match="checksum mismatch"):
        unpack(content)


def reference(url, blob):
    """A reply that names ``url`` for ``blob``, with the right size and checksum."""
    content = pack(blob)
    del content.array_records["payload"]
    content.config_records["meta"]["url"] = url
    return content


@pytest.mark.parametrize("where", [
    "file:///etc/hostname",  # any file of the coordinator's machine
    "http://169.254.169.254/latest/meta-data/",  # the cloud's metadata service
    "{store}/run/sites/bob/round-00001/update",  # another site's object
    "{store}/run/sites/alice/round-00002/update",  # another round's
    "{store}/run/sites/alice/round-00001/../../bob/round-00001/update",  # climbing out
    "{store}/run/sites/alice/round-00001/sub/update",  # below the folder
    "{store}/run/coordinator/round-00001/global.safetensors",  # the coordinator's own
    "{store}/other-run/sites/alice/round-00001/update",  # another run's
])
def test_a_reference_outside_the_expected_folder_is_not_opened(tmp_path, where):
    store = f"file://{tmp_path / 'store'}"
    secret = tmp_path / "secret"
    secret.write_bytes(b"the coordinator's private bytes")
    url = where.format(store=store)
    if url.startswith(store):  # make the object exist, so only the check can refuse it
        path = tmp_path / "store" / url[len(store) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secret.read_bytes())
    folder = object_folder(store, "run", "alice", "round", 1)
    with pytest.raises(WireError, match="is not an object in|no object store"):
        unpack(reference(url, secret.read_bytes()), folder)
    with pytest.raises(WireError, match="no object store is expected"):
        unpack(reference(url, secret.read_bytes()))  # no store: no references at all


def test_oversized_and_stalled_objects_are_refused(tmp_path):
    folder = object_folder(f"file://{tmp_path}", "run", "alice", "round", 1)
    content = pack(os.urandom(5000), folder, "update")
    with pytest.raises(WireError, match="over the 4096-byte cap"):
        unpack(content, folder, max_bytes=4096)
    with pytest.raises(WireError, match="over the 4096-byte cap"):
        unpack(pack(os.urandom(5000)), max_bytes=4096)  # inline too
    # a store that never answers: opening a FIFO for reading blocks until a writer comes
    fifo = tmp_path / "run" / "sites" / "alice" / "round-00001" / "stalled"
    os.mkfifo(fifo)
    with pytest.raises(WireError, match="took over 1s"):  # the reader thread is left behind
        unpack(reference(folder + "stalled", b"x" * 10), folder, timeout_s=1.0)


def test_names_that_cannot_be_folders_are_refused():
    for run, writer in [("../up", "alice"), ("run", "a/b"), ("run", ".."), ("", "alice")]:
        with pytest.raises(WireError, match="cannot name a folder"):
            object_folder("file:///s", run, writer, "round", 1)


def test_old_rounds_objects_are_deleted_once_released(tmp_path):
    engine = FlowerEngine(None, store=f"file://{tmp_path}")
    for r in (1, 2, 3):
        for writer in ("coordinator", "alice"):
            pack(b"x", engine._folder("run", writer, "train", r), "obj")
    engine.release(3)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("obj"))
    assert left == ["run/coordinator/round-00003/obj", "run/sites/alice/round-00003/obj"]
    engine.release(3)  # again: nothing left to do, no error
