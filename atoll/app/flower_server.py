"""The coordinator as a Flower ServerApp: the same :class:`~atoll.app.run.Run` as a simulation,
with :class:`~atoll.engines.flower.FlowerEngine` moving the messages.

``flwr run`` starts this inside the SuperLink's ServerApp process; its run config names the
resolved ``config.toml``, the run folder and whether to resume.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from atoll.deploy.coordinator_host import SERVERAPP_PID
from atoll.util.atomic import write_atomic
from atoll.util.heap import return_large_frees_to_os

server_app = ServerApp()


@server_app.main()
def coordinator_main(grid: Grid, context: Context) -> None:
    """Run the federation in the folder the run config names, then export and report."""
    from atoll.app.html_report import write_report
    from atoll.app.progress import Progress
    from atoll.app.run import Run
    from atoll.app.run_config import load_run_config
    from atoll.engines.flower import FlowerEngine

    # the peak then holds whatever the number of sites (atoll.util.heap)
    return_large_frees_to_os()
    rc = context.run_config
    out = Path(str(rc["out"]))
    # a coordinator restarted after a crash ends this process if it outlived the SuperLink
    write_atomic(out / "flower" / SERVERAPP_PID, str(os.getpid()).encode())
    cfg = load_run_config(str(rc["config"]), simulation=False)
    cfg.baseline.kinds = []  # the sites' data is not here: baselines are simulation-only
    progress = Progress(stream=sys.stdout, interval_s=0.0)
    run = Run(cfg, out, resume=bool(rc["resume"]), progress=progress)
    # the largest honest reply: an fp32 update of every parameter, its header and slack
    params = sum(w.numel() for w in run.coordinator.weights.values())
    engine = FlowerEngine(grid, store=cfg.comm.store, min_sites=cfg.federation.min_sites,
                          allowed={s.name for s in cfg.sites} or None, log=progress.log,
                          max_reply_bytes=4 * params + params // 16 + (16 << 20),
                          registered_only=bool(rc.get("authenticated", False)),
                          on_sites=lambda nodes: run.status.sites(list(nodes)))
    run.execute(engine)
    run.finish()
    write_report(out)
    run.close()
    progress.log(f"run finished: {out / 'model'}")
