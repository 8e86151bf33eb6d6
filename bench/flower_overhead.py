"""What Flower costs: round time against the local engine, and moving large updates.

1. The same tiny federation (3 sites, same config and seed) on the local engine and on the
   Flower Deployment Engine over loopback (1 SuperLink + 3 SuperNodes, insecure mode so
   the figure is Flower's, not TLS's): wall seconds per round and the ratio.
2. A payload of 100 MB and 1 GB sent to one SuperNode and the same size back, inside Flower
   messages and through a ``file://`` object store (atoll's transport either way).

    python bench/flower_overhead.py [--sizes 100,1000] [--rounds 4] [--steps 20] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
from smoke import parse

from atoll.app.metrics import read_metrics
from atoll.app.run_config import load_run_config
from atoll.app.simulate import simulate
from atoll.data.demo import build_demo_data
from atoll.deploy import flower_cli as fc

SITES = ("code", "scripture", "speeches")
SMOKE = {"sizes": "1", "rounds": 2, "steps": 2, "batch": 2, "tokens": 40_000, "sites": 2}


def round_seconds(run_dir: Path) -> list[float]:
    return [r["seconds"] for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == "round" and r["run"] == "federation" and r["round"] > 0]


def federation_rounds(tmp: Path, args: argparse.Namespace) -> None:
    rounds, steps, sites = args.rounds, args.steps, SITES[: args.sites]
    data = build_demo_data(tmp / "data", tokens_per_domain=args.tokens, log=lambda s: None)
    tree = {"name": "bench", "seed": 0,
            "inner": {"batch_size": args.batch}, "baseline": {"kinds": []},
            "federation": {"rounds": rounds, "steps_per_round": steps,
                           "min_sites": len(sites)},
            "eval": {"every": 1000, "max_batches": 1},
            "sites": [{"name": s, "data": str(data[s])} for s in sites]}
    config = tmp / "fed.toml"
    config.write_text(tomli_w.dumps(tree))
    simulate(load_run_config(config), tmp / "local", report=False)
    local = round_seconds(tmp / "local")

    port = fc.free_port()
    atoll = [sys.executable, "-m", "atoll"]
    procs = [subprocess.Popen([*atoll, "coordinator", str(config), "--out", str(tmp / "flower"),
                               "--insecure", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)]
    for s in sites:
        procs.append(subprocess.Popen(
            [*atoll, "site", "--coordinator", f"127.0.0.1:{port}", "--data", str(data[s]),
             "--name", s, "--insecure", "--threads", "1", "--state", str(tmp / "state" / s)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
    procs[0].wait(timeout=1800)
    for p in procs:  # the coordinator too: nothing it started may outlive it
        fc.stop_group(p)
    flower = round_seconds(tmp / "flower")
    # the first round includes start-up (model build, first connection): report the rest
    lm, fm = statistics.median(local[1:]), statistics.median(flower[1:])
    print(f"round time, {len(sites)} sites x {steps} steps (median of rounds 2-{rounds}):")
    print(f"  local engine   {lm:6.2f} s")
    print(f"  Flower         {fm:6.2f} s   ratio Flower / local: {fm / lm:.2f}")


def payloads(tmp: Path, sizes: list[float]) -> None:
    """An update's round trip to one SuperNode on loopback: inside Flower messages straight
    to the SuperLink, the same through atoll's fleet gate (what `atoll coordinator` puts on
    the public port), and through a file:// object store."""
    home = tmp / "echo-home"
    env = fc.flower_env(home)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    port, gate_port = fc.free_port(), fc.free_port()
    link = fc.start([fc.tool("flower-superlink"), "--disable-runtime-dependency-installation",
                     "--insecure", "--host", "127.0.0.1", "--port", str(port)],
                    tmp / "echo-superlink.log", env)
    gate = node = None
    try:
        fc.wait_for_port("127.0.0.1", port, 60, link)
        gate = fc.start([sys.executable, "-m", "atoll.deploy.fleet_gate", "--listen",
                         f"127.0.0.1:{gate_port}", "--upstream", f"127.0.0.1:{port}"],
                        tmp / "echo-gate.log", env)
        fc.wait_for_port("127.0.0.1", gate_port, 60, gate)
        fc.write_connection(home, f"127.0.0.1:{port}", None)
        app = _echo_app(tmp)
        print("moving an update to a site and the same size back (loopback):")
        for mb in sizes:
            for i, mode in enumerate(("messages", "messages via gate", "file:// store")):
                fc.stop(node)  # one SuperNode at a time: the echo app talks to the one there
                via = gate_port if mode == "messages via gate" else port
                node = fc.start([fc.tool("flower-supernode"), "--insecure", "--superlink",
                                 f"127.0.0.1:{via}", "--port", str(fc.free_port())],
                                tmp / "echo-supernode.log", env)
                store = f"file://{tmp / 'store'}" if mode == "file:// store" else ""
                res = _echo(app, env, mb, store, tmp / f"echo-{mb}-{i}.json")
                print(f"  {mb:6.0f} MB each way via {mode:<17} {res['seconds']:7.1f} s  "
                      f"({2 * mb / res['seconds']:6.1f} MB/s)  ok={res['ok']}")
                shutil.rmtree(tmp / "store", ignore_errors=True)
    finally:
        fc.stop(node)
        fc.stop(gate)
        fc.stop(link)


def _echo_app(tmp: Path) -> Path:
    app = tmp / "echo-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        fc.write_app(tmp / "tmp-app").joinpath("pyproject.toml").read_text()
        .replace("atoll.engines.flower_client:", "flower_echo_app:")
        .replace("atoll.app.flower_server:", "flower_echo_app:")
        .replace('config = ""', 'mb = 1.0\nstore = ""'))
    return app


def _echo(app: Path, env: dict[str, str], mb: float, store: str, out: Path) -> dict:
    """One echo run: its result, once the ServerApp has written it."""
    fc.flwr(["run", str(app), fc.CONNECTION, "--run-config",
             f"mb={mb} store='{store}' out='{out}'"], env)
    deadline = time.monotonic() + 1800
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000", help="payload sizes in MB")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-rounds", action="store_true")
    ap.add_argument("--batch", type=int, default=16, help="rows of 128 tokens per step")
    ap.add_argument("--tokens", type=int, default=300_000, help="tokens of data per site")
    ap.add_argument("--sites", type=int, default=len(SITES), choices=range(1, len(SITES) + 1),
                    help="sites in the federation")
    args = parse(ap, SMOKE)
    tmp = Path(tempfile.mkdtemp(prefix="atoll-flower-bench-"))
    try:
        if not args.skip_rounds:
            federation_rounds(tmp, args)
        payloads(tmp, [float(s) for s in args.sizes.split(",") if s])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
