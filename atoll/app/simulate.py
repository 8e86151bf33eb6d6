"""``atoll simulate``: a whole federation on this machine, with the local engine."""

from __future__ import annotations

from pathlib import Path

from atoll.app.html_report import write_report
from atoll.app.progress import Progress
from atoll.app.run import Run
from atoll.app.run_config import RunConfig
from atoll.engines.local import LocalEngine
from atoll.federation.faults import make_site
from atoll.train.device import resolve_device


def simulate(cfg: RunConfig, out: str | Path, *, resume: bool = False,
             progress: Progress | None = None, report: bool = True) -> Run:
    """Run (or resume) the federation described by ``cfg`` into ``out``; returns the run."""
    progress = progress or Progress(quiet=True)
    resolve_device(cfg.device)  # no CUDA where it was asked for: say so before writing
    run = Run(cfg, out, resume=resume, progress=progress)
    sites = [make_site(s.name, s.data, run.out / "sites" / s.name, pace_s=s.pace_s,
                       fault=s.fault, device=cfg.device) for s in cfg.sites]
    steps = cfg.federation.steps_per_round
    rounds = cfg.federation.rounds

    def on_step(site: str, round_: int, step: int, loss: float) -> None:
        of = f"/{steps}" if steps and not cfg.federation.time_budget_s else ""
        progress.update(f"round {round_}/{rounds}  site {site}  step {step}{of}  loss {loss:.3f}")
        run.status.stepped(site, step, loss)

    run.status.sites([s.name for s in sites])
    engine = LocalEngine(sites, on_step=on_step, parallel=cfg.parallel)
    try:
        run.execute(engine)
        run.finish()
        if report:
            write_report(run.out)
    finally:
        engine.close()
        run.close()
        progress.close()
    return run
