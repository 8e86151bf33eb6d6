"""A Flower App for bench/flower_overhead.py: the server sends an N-MB payload with atoll's
transport (inline or object store), the client decodes it and sends the same size back."""

from __future__ import annotations

import json
import os
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from atoll.engines.transport import object_folder, pack, unpack

server_app = ServerApp()
client_app = ClientApp()


def folder(store: str, writer: str) -> str:
    """Where ``writer``'s object goes in the store ("" = inside the message)."""
    return object_folder(store, "bench", writer, "round", 1) if store else ""


def _newest_node(grid: Grid) -> int:
    """The node that came online last (a SuperNode stopped a moment ago may still be
    listed as online until its heartbeat runs out)."""
    while True:
        online = [n for n in grid.get_nodes() if n.status == "online"]
        if online:
            return max(online, key=lambda n: n.last_activated_at).node_id
        time.sleep(0.5)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    size = int(float(rc["mb"]) * 1e6)
    store = str(rc["store"])
    out = str(rc["out"])
    node = _newest_node(grid)
    blob = os.urandom(size)  # random: Flower stores identical chunks only once
    start = time.perf_counter()
    msg = Message(pack(blob, folder(store, "coordinator"), "down"), dst_node_id=node,
                  message_type="train",
                  group_id="1")
    (mid,) = grid.push_messages([msg])
    replies: list[Message] = []
    while not replies:  # poll quickly: send_and_receive sleeps 3 s between pulls
        replies = list(grid.pull_messages([mid]))
        time.sleep(0.05)
    back = unpack(replies[0].content, folder(store, "site"))
    seconds = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump({"mb": size / 1e6, "seconds": seconds, "ok": len(back) == size}, f)


@client_app.train()
def echo(msg: Message, context: Context) -> Message:
    url = str(msg.content.config_records["meta"].get("url", ""))
    store = url.rsplit("/bench/", 1)[0] if url else ""
    blob = unpack(msg.content, folder(store, "coordinator"))
    return Message(pack(os.urandom(len(blob)), folder(store, "site"), "up"), reply_to=msg)
