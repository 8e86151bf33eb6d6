"""A federation over an emulated internet link, with and without overlapped sync.

Two sites join a coordinator on this machine through ``atoll.deploy.slowlink`` (default 20 Mbit/s,
100 ms each way, 1% loss), on the Flower engine. Compute utilisation is the time each site
spends in inner steps over the wall time of the run: without overlap a site idles while its
update crosses the link and the next plan comes back; with overlap (Streaming DiLoCo) it
trains on and merges the new global fragment when it arrives.

    python bench/wan.py [--mbit 20] [--latency-ms 100] [--loss 0.01] [--h 40] [--rounds 6]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomli_w

from atoll.app.metrics import read_metrics
from atoll.data.demo import build_demo_data
from atoll.deploy import flower_cli as fc
from atoll.deploy.slowlink import LinkConfig, SlowLink

SITES = ("code", "scripture")


def run(tmp: Path, name: str, data: dict, args: argparse.Namespace, overlap: int) -> None:
    tree = {"name": name, "seed": 0,
            "inner": {"batch_size": 16, "total_steps": args.rounds * args.h},
            "federation": {"rounds": args.rounds, "steps_per_round": args.h,
                           "min_sites": len(SITES), "fragments": args.fragments,
                           "overlap_steps": overlap},
            "eval": {"every": 10_000, "max_batches": 1}, "credit": {"batches": 0},
            "baseline": {"kinds": []},
            "sites": [{"name": s} for s in SITES]}
    config = tmp / f"{name}.toml"
    config.write_text(tomli_w.dumps(tree))
    port = fc.free_port()
    link = SlowLink(("127.0.0.1", 0), ("127.0.0.1", port),
                    LinkConfig(mbit=args.mbit, latency_ms=args.latency_ms, loss=args.loss))
    link.start()
    atoll = [sys.executable, "-m", "atoll"]
    out = tmp / name
    procs = [subprocess.Popen([*atoll, "coordinator", str(config), "--out", str(out),
                               "--insecure", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    for s in SITES:  # the sites dial the slow link, not the coordinator
        procs.append(subprocess.Popen(
            [*atoll, "site", "--coordinator", f"127.0.0.1:{link.listen[1]}", "--data",
             str(data[s]), "--name", s, "--insecure", "--threads", "1",
             "--state", str(tmp / f"{name}-state" / s)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    try:
        procs[0].wait(timeout=3600)
    finally:
        for p in procs[1:]:
            fc.stop(p)
        link.stop()
    records = read_metrics(out / "metrics.jsonl")
    rounds = [r for r in records if r["kind"] == "round" and r["round"] > 0]
    sites = [r for r in records if r["kind"] == "site" and r.get("accepted")]
    # the first round includes connecting and model building: measure from its end
    wall = rounds[-1]["ended"] - rounds[0]["ended"]
    compute = sum(r["compute_seconds"] for r in sites if r["round"] > 1)
    mb = sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / 1e6
    print(f"{name:<22} compute utilisation {compute / (len(SITES) * wall):6.1%}   "
          f"{wall / (len(rounds) - 1):5.1f} s/round   {mb:6.1f} MB on the wire   "
          f"{link.stats.lost} of {link.stats.segments} segments resent")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbit", type=float, default=20.0)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--loss", type=float, default=0.01)
    ap.add_argument("--h", type=int, default=40, help="inner steps per round")
    ap.add_argument("--overlap", type=int, default=30, help="overlap steps (the cap)")
    ap.add_argument("--fragments", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="atoll-wan-"))
    data = build_demo_data(tmp / "data", tokens_per_domain=1_500_000, log=lambda s: None)
    print(f"{len(SITES)} sites on the Flower engine over {args.mbit:g} Mbit/s, "
          f"{args.latency_ms:g} ms, {args.loss:.0%} loss; {args.rounds} rounds of {args.h} "
          f"steps (batch 16 x 128, 1 thread per site), {args.fragments} fragment(s)")
    try:
        run(tmp, "no overlap", data, args, 0)
        run(tmp, f"overlap {args.overlap} steps", data, args, args.overlap)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
