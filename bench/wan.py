"""A federation over an emulated internet link, with and without overlapped sync.

Two sites join a coordinator on this machine through ``atoll.deploy.slowlink`` (default 20 Mbit/s,
100 ms each way, 1% loss), on the Flower engine. Compute utilisation is the time each site
spends in inner steps over the wall time of the run: without overlap a site idles while its
update crosses the link and the next plan comes back; with overlap (Streaming DiLoCo) it
trains on and merges the new global fragment when it arrives.

Only the steps of rounds 2 on count (round 1 holds connecting and model building). The
window of a site opens when it says it has sent its round-1 update, which is when its steps
ahead for round 2 begin, and closes when the coordinator closes the last round, after the
site's last update has crossed the link: every counted step lies inside it, so no
utilisation can exceed 100%. (Opening it when the coordinator closed round 1 missed the
steps trained ahead meanwhile, and read 102%.)

    python bench/wan.py [--mbit 20] [--latency-ms 100] [--loss 0.01] [--h 40] [--rounds 6]
                        [--smoke]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tomli_w
from smoke import parse

from atoll.app.metrics import read_metrics
from atoll.data.demo import build_demo_data
from atoll.deploy import flower_cli as fc
from atoll.deploy.slowlink import LinkConfig, SlowLink

SITES = ("code", "scripture")
ROWS = ("no-overlap", "overlap")
# the overlap row alone: the other runs the same code without the steps ahead
SMOKE = {"mbit": 200.0, "latency_ms": 5.0, "h": 3, "overlap": 2, "rounds": 2, "batch": 2,
         "tokens": 40_000, "rows": "overlap"}
# what `atoll site` prints once it has sent a round's update
SENT = re.compile(r"\bround (\d+): \d+ steps")


def watch(proc: subprocess.Popen, sent: dict[int, float]) -> threading.Thread:
    """Read ``proc``'s output to its end, noting when it says it sent each round's update
    (this clock is the coordinator's: both run on this machine)."""
    def read() -> None:
        for line in proc.stdout:
            m = SENT.search(line)
            if m:
                sent.setdefault(int(m.group(1)), time.time())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def run(tmp: Path, name: str, data: dict, args: argparse.Namespace, overlap: int) -> None:
    tree = {"name": name, "seed": 0,
            "inner": {"batch_size": args.batch, "total_steps": args.rounds * args.h},
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
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)]
    sent: dict[str, dict[int, float]] = {s: {} for s in SITES}
    readers = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its lines are timed as they come
    for s in SITES:  # the sites dial the slow link, not the coordinator
        procs.append(subprocess.Popen(
            [*atoll, "site", "--coordinator", f"127.0.0.1:{link.listen[1]}", "--data",
             str(data[s]), "--name", s, "--insecure", "--threads", "1",
             "--state", str(tmp / f"{name}-state" / s)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True))
        readers.append(watch(procs[-1], sent[s]))
    try:
        procs[0].wait(timeout=3600)
    finally:
        for p in procs:  # the coordinator too: nothing it started may outlive it
            fc.stop_group(p)
        link.stop()
        for r in readers:
            r.join(timeout=10)
    records = read_metrics(out / "metrics.jsonl")
    rounds = [r for r in records if r["kind"] == "round" and r["round"] > 0]
    sites = [r for r in records if r["kind"] == "site" and r.get("accepted")]
    end = rounds[-1]["ended"]
    missing = [s for s in SITES if 1 not in sent[s]]
    if missing:
        raise RuntimeError(f"no 'round 1: N steps' line from site(s) {missing}: has the "
                           "output of `atoll site` changed?")
    # per site: from its round-1 update sent to the last round's close, the steps after
    window = sum(end - sent[s][1] for s in SITES)
    compute = sum(r["compute_seconds"] for r in sites if r["round"] > 1)
    wall = end - rounds[0]["ended"]
    mb = sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / 1e6
    print(f"{name:<22} compute utilisation {compute / window:6.1%}   "
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
    ap.add_argument("--batch", type=int, default=16, help="rows of 128 tokens per step")
    ap.add_argument("--tokens", type=int, default=1_500_000, help="tokens of data per site")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, of {','.join(ROWS)}")
    args = parse(ap, SMOKE)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="atoll-wan-"))
    data = build_demo_data(tmp / "data", tokens_per_domain=args.tokens, log=lambda s: None)
    print(f"{len(SITES)} sites on the Flower engine over {args.mbit:g} Mbit/s, "
          f"{args.latency_ms:g} ms, {args.loss:.0%} loss; {args.rounds} rounds of {args.h} "
          f"steps (batch {args.batch} x 128, 1 thread per site), {args.fragments} fragment(s)")
    rows = args.rows.split(",")
    try:
        if "no-overlap" in rows:
            run(tmp, "no overlap", data, args, 0)
        if "overlap" in rows:
            run(tmp, f"overlap {args.overlap} steps", data, args, args.overlap)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
