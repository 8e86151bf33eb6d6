"""How a message's bytes travel on Flower: inside the message, or through an object store.

By default the serialized plan or update rides inside the Flower message (Flower splits it
into 5 MiB chunks). With ``comm.store = URL`` (any fsspec URL: ``file://``, ``s3://``,
``gs://``) the bytes are written to the store and the message carries only the object's URL,
its size and its SHA-256; the receiver refuses an object whose checksum does not match.
Either way the receiver gets exactly the bytes :func:`~atoll.federation.protocol.to_bytes`
produced, so the coordinator and the site never see the difference.
"""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from atoll.util.errors import WireError


def pack(blob: bytes, store: str = "", key: str = "") -> RecordDict:
    """A Flower ``RecordDict`` carrying ``blob`` (or a reference to it in ``store``)."""
    meta = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    if not store:
        payload = ArrayRecord([np.frombuffer(blob, dtype=np.uint8)])
        return RecordDict({"payload": payload, "meta": ConfigRecord(meta)})
    import fsspec

    url = f"{store.rstrip('/')}/{key}"
    with fsspec.open(url + ".tmp", "wb", auto_mkdir=True) as f:
        f.write(blob)
    fs, path = fsspec.core.url_to_fs(url)
    fs.mv(path + ".tmp", path)  # a reader never sees a half-written object
    return RecordDict({"meta": ConfigRecord({**meta, "url": url})})


def unpack(content: RecordDict) -> bytes:
    """The bytes a :func:`pack` message carries; :class:`WireError` if absent or altered."""
    try:
        meta = content.config_records["meta"]
        expected, size = str(meta["sha256"]), int(meta["size"])
    except (KeyError, TypeError, ValueError):
        raise WireError("message has no payload description") from None
    if "url" in meta:
        import fsspec

        try:
            with fsspec.open(str(meta["url"]), "rb") as f:
                blob = f.read()
        except (OSError, ValueError) as e:
            raise WireError(f"cannot read {meta['url']}: {e}") from None
        where = str(meta["url"])
    else:
        try:
            blob = content.array_records["payload"].to_numpy_ndarrays()[0].tobytes()
        except (KeyError, IndexError):
            raise WireError("message has no payload") from None
        where = "message"
    if len(blob) != size or hashlib.sha256(blob).hexdigest() != expected:
        raise WireError(f"checksum mismatch for {where} ({len(blob)} bytes, expected {size})")
    return blob
