"""How a message's bytes travel on Flower: inside the message, or through an object store.

By default the serialized plan or update rides inside the Flower message (Flower splits it
into 5 MiB chunks). With ``comm.store = URL`` (any fsspec URL: ``file://``, ``s3://``,
``gs://``) the bytes are written to the store and the message carries only the object's URL,
its size and its SHA-256; the receiver refuses an object whose checksum does not match.
Either way the receiver gets exactly the bytes :func:`~atoll.federation.protocol.to_bytes`
produced, so the coordinator and the site never see the difference.

A reference is a stranger's word for where to read: it is accepted only when it names one
object directly under the folder the receiver expects (:func:`object_folder`: this run, this
round, the writer it came from), with a size under the receiver's cap, and it is read with a
timeout. Any other URL, protocol or path is refused without being opened. Each writer has a
prefix of its own (``RUN/coordinator/...``, ``RUN/sites/NAME/...``), so a bucket policy can
let each site write under its own prefix only.
"""

from __future__ import annotations

import hashlib
import re
import threading

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from atoll.util.errors import WireError

READ_TIMEOUT_S = 600.0
"""How long reading one object from the store may take before the reply is refused."""
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def plain_name(name: str) -> bool:
    """Whether ``name`` (a run id, a site's name) can be a folder's name in any store."""
    return bool(_NAME.fullmatch(name)) and name not in (".", "..")


def object_folder(store: str, run_id: str, writer: str, kind: str, round_: int) -> str:
    """The URL of the folder ``writer`` (``coordinator`` or a site's name) writes its
    ``kind`` objects of ``round_`` into; a receiver accepts references there only."""
    for part in (run_id, writer, kind):
        if not plain_name(part):
            raise WireError(f"{part[:100]!r} cannot name a folder in the object store")
    owner = "coordinator" if writer == "coordinator" else f"sites/{writer}"
    return f"{store.rstrip('/')}/{run_id}/{owner}/{kind}-{round_:05d}/"


def pack(blob: bytes, folder: str = "", name: str = "") -> RecordDict:
    """A Flower ``RecordDict`` carrying ``blob`` (or a reference to it as ``folder/name``
    in an object store, when ``folder`` is given)."""
    meta = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    if not folder:
        payload = ArrayRecord([np.frombuffer(blob, dtype=np.uint8)])
        return RecordDict({"payload": payload, "meta": ConfigRecord(meta)})
    import fsspec

    url = folder + name
    with fsspec.open(url + ".tmp", "wb", auto_mkdir=True) as f:
        f.write(blob)
    fs, path = fsspec.core.url_to_fs(url)
    fs.mv(path + ".tmp", path)  # a reader never sees a half-written object
    return RecordDict({"meta": ConfigRecord({**meta, "url": url})})


def unpack(content: RecordDict, folder: str = "", max_bytes: int = 0,
           timeout_s: float = READ_TIMEOUT_S) -> bytes:
    """The bytes a :func:`pack` message carries; :class:`WireError` if absent, altered,
    larger than ``max_bytes`` (0 = no cap), or a reference anywhere but one object directly
    in ``folder`` (no folder: references are refused)."""
    try:
        meta = content.config_records["meta"]
        expected, size = str(meta["sha256"]), int(meta["size"])
    except (KeyError, TypeError, ValueError):
        raise WireError("message has no payload description") from None
    if size < 0 or (max_bytes and size > max_bytes):
        raise WireError(f"payload of {size} bytes is over the {max_bytes}-byte cap")
    if "url" in meta:
        where = str(meta["url"])
        _check_reference(where, folder)
        blob = _read(where, size, timeout_s)
    else:
        try:
            blob = content.array_records["payload"].to_numpy_ndarrays()[0].tobytes()
        except (KeyError, IndexError):
            raise WireError("message has no payload") from None
        where = "message"
    if len(blob) != size or hashlib.sha256(blob).hexdigest() != expected:
        raise WireError(f"checksum mismatch for {where} ({len(blob)} bytes, expected {size})")
    return blob


def _check_reference(url: str, folder: str) -> None:
    """Refuse a reference that is not one plainly named object directly in ``folder``."""
    if not folder:
        raise WireError(f"payload reference {url[:200]!r}, but no object store is expected")
    name = url[len(folder):] if url.startswith(folder) else ""
    if not plain_name(name):
        raise WireError(f"payload reference {url[:200]!r} is not an object in {folder}")


def _read(url: str, size: int, timeout_s: float) -> bytes:
    """Up to ``size + 1`` bytes of the object at ``url`` (one more shows a longer one),
    within ``timeout_s``: a store that does not answer costs one reply, not the round."""
    import fsspec

    result: list[bytes | BaseException] = []

    def read() -> None:
        try:
            with fsspec.open(url, "rb") as f:
                result.append(f.read(size + 1))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            result.append(e)

    reader = threading.Thread(target=read, daemon=True)  # a hung read must not block exit
    reader.start()
    reader.join(timeout_s)
    if not result:
        raise WireError(f"reading {url} took over {timeout_s:.0f}s")
    if isinstance(result[0], BaseException):
        raise WireError(f"cannot read {url}: {result[0]}")
    return result[0]
