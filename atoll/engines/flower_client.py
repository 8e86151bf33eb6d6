"""A site as a Flower ClientApp (the coordinator's ServerApp is :mod:`atoll.app.flower_server`).

The SuperNode's ``--node-config`` says who the site is: ``name``, ``data`` (a prepared
directory), ``state`` (a directory of its own), ``device`` (where it trains without a worker;
default ``auto``), and ``worker = true`` when ``atoll site`` runs a site worker beside it
(:mod:`atoll.engines.site_worker`). Flower starts a fresh ClientApp process for every
message, so with a worker the ClientApp is a thin shim that passes bytes to the long-lived
trainer and back, without importing torch; without one it trains in its own process,
rebuilding from the state directory every round.

Keep this module's top level light: every ClientApp process imports it.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from atoll.engines.site_worker import call_worker
from atoll.engines.transport import object_folder, pack, unpack

client_app = ClientApp()


@client_app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Tell the coordinator which site this node serves (insecure mode has no registry)."""
    site = ConfigRecord({"name": str(context.node_config["name"])})
    return Message(RecordDict({"site": site}), reply_to=msg)


@client_app.query("features")
def site_features(msg: Message, context: Context) -> Message:
    """Features of a sample of the site's rows, for fitting a grid's router."""
    return _answer(msg, context, "features")


@client_app.train()
def site_main(msg: Message, context: Context) -> Message:
    """One round at a site: plan bytes in, update bytes out."""
    return _answer(msg, context, "update")


@client_app.evaluate()
def site_evaluate(msg: Message, context: Context) -> Message:
    """The global weights measured on the site's held-out rows: request in, report out."""
    return _answer(msg, context, "eval")


def _answer(msg: Message, context: Context, suffix: str) -> Message:
    """Hand a message's header and bytes to the site (or its worker); pack its answer."""
    node = context.node_config
    rec = msg.content.config_records["plan"]
    store = str(rec["store"])
    head = json.loads(str(rec["header"]))
    kind = {"update": "round", "eval": "eval", "features": "features"}[suffix]
    r = int(head["round"])
    blob = unpack(msg.content, object_folder(store, str(head["run_id"]), "coordinator", kind, r)
                  if store else "")
    if node.get("worker", False):
        reply, out = call_worker(str(node["state"]), head, blob)
    else:
        import torch

        from atoll.federation.faults import make_site

        if int(node.get("threads", 0)) > 0:
            torch.set_num_threads(int(node["threads"]))
        site = make_site(str(node["name"]), str(node["data"]), str(node["state"]),
                         fault=str(node.get("fault", "")),
                         device=str(node.get("device", "auto")))
        reply, out = site.answer(head, blob)
    # an evaluation report has no payload: nothing to write to the store
    folder = object_folder(store, str(head["run_id"]), str(node["name"]), kind, r) \
        if store and out else ""
    payload = pack(out, folder, suffix)
    payload["update"] = ConfigRecord({"header": json.dumps(reply)})
    return Message(payload, reply_to=msg)
