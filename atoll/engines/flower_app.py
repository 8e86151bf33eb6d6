"""atoll as a Flower App: the ServerApp runs the coordinator, the ClientApp runs a site.

Flower starts a fresh ClientApp process for every message, so the site keeps nothing in
memory: it rebuilds from the plan and from its own state directory (inner optimizer, data
cursor), which :class:`~atoll.federation.site.Site` saves after every round. The SuperNode's
``--node-config`` says who the site is: ``name``, ``data`` (a prepared directory), ``state``
(a directory of its own) and optionally ``threads``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from atoll.engines.flower import FlowerEngine
from atoll.engines.transport import pack, unpack
from atoll.federation.faults import apply_fault
from atoll.federation.protocol import RoundPlan, from_parts, header, tensor_bytes
from atoll.federation.site import Site

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def coordinator_main(grid: Grid, context: Context) -> None:
    """The coordinator: the same Run as a simulation, with Flower moving the messages."""
    from atoll.progress import Progress
    from atoll.report import write_report
    from atoll.run import Run
    from atoll.run_config import load_run_config

    rc = context.run_config
    out = Path(str(rc["out"]))
    cfg = load_run_config(str(rc["config"]), simulation=False)
    cfg.baseline.kinds = []  # the sites' data is not here: baselines are simulation-only
    progress = Progress(stream=sys.stdout, interval_s=0.0)
    run = Run(cfg, out, resume=bool(rc["resume"]), progress=progress)
    engine = FlowerEngine(grid, store=cfg.comm.store, min_sites=cfg.federation.min_sites,
                          allowed={s.name for s in cfg.sites} or None, log=progress.log,
                          on_sites=lambda nodes: run.status.sites(list(nodes)))
    run.execute(engine)
    run.finish()
    write_report(out)
    progress.log(f"run finished: {out / 'model'}")


def _site(context: Context) -> Site:
    cfg = context.node_config
    return Site(str(cfg["name"]), str(cfg["data"]), str(cfg["state"]))


@client_app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Tell the coordinator which site this node serves (insecure mode has no registry)."""
    site = ConfigRecord({"name": str(context.node_config["name"])})
    return Message(RecordDict({"site": site}), reply_to=msg)


@client_app.train()
def site_main(msg: Message, context: Context) -> Message:
    """One round at a site: decode the plan, train, send the pseudo-gradient back."""
    import torch

    threads = int(context.node_config.get("threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    site = _site(context)
    rec = msg.content.config_records["plan"]
    store = str(rec["store"])
    plan = from_parts(json.loads(str(rec["header"])), unpack(msg.content), RoundPlan)
    if plan.site != site.name:
        raise ValueError(f"plan addressed to site {plan.site!r} reached site {site.name!r}")
    start = time.time()
    update = site.run(plan)
    update, blob = apply_fault(update, tensor_bytes(update.delta),
                               str(context.node_config.get("fault", "")))
    payload = pack(blob, store, f"{plan.run_id}/round-{plan.round:05d}/{site.name}.update")
    payload["update"] = ConfigRecord({"header": json.dumps(header(update))})
    _activity(site, f"round {plan.round}: {update.steps} steps, {update.tokens} tokens, "
                    f"loss {update.train_loss:.4f}, {time.time() - start:.1f}s")
    return Message(payload, reply_to=msg)


def _activity(site: Site, line: str) -> None:
    """A line for ``atoll site``'s console (the ClientApp's own output goes to Flower's log)."""
    site.state_dir.mkdir(parents=True, exist_ok=True)
    with open(site.state_dir / "activity.log", "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {line}\n")
