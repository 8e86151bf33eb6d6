"""``report.html`` and its PNG plots, made from a run folder's ``metrics.jsonl`` alone."""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from atoll.app.metrics import FEDERATION, mean_loss, read_metrics  # noqa: E402
from atoll.util.atomic import write_atomic  # noqa: E402


def _rounds(records: list[dict], run: str) -> list[dict]:
    return [r for r in records if r["kind"] == "round" and r["run"] == run]


def plot_validation(records: list[dict], path: Path) -> None:
    """Validation loss per domain over tokens: federation solid, baselines dashed."""
    runs = sorted({r["run"] for r in records if r["kind"] == "round"},
                  key=lambda n: (n != FEDERATION, n))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors: dict[str, str] = {}
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        points = [r for r in _rounds(records, run) if r.get("val_loss")]
        domains = sorted({d for r in points for d in r["val_loss"]})
        for d in domains:
            xs = [r["tokens"] / 1e6 for r in points if d in r["val_loss"]]
            ys = [r["val_loss"][d] for r in points if d in r["val_loss"]]
            line, = ax.plot(xs, ys, styles[i % len(styles)], color=colors.get(d),
                            label=f"{d} ({run})", marker="o" if run == FEDERATION else None,
                            markersize=3)
            colors.setdefault(d, line.get_color())
    later = [v for r in records if r["kind"] == "round" and r["round"] > 0 and r.get("val_loss")
             for v in r["val_loss"].values()]
    if later:  # the untrained model's loss would flatten everything after it
        ax.set_ylim(min(later) * 0.97, max(later) * 1.05)
    ax.set_xlabel("tokens trained (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss per domain: federation vs centralised")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes(records: list[dict], path: Path) -> None:
    """Cumulative bytes that crossed the network, up (sites -> coordinator) and down."""
    rounds = _rounds(records, FEDERATION)
    xs = [r["round"] for r in rounds]
    up, down, dp, tu, td, tp = [], [], [], 0, 0, 0
    for r in rounds:
        tu += r.get("bytes_up", 0)
        td += r.get("bytes_down", 0)
        tp += r.get("dp_bytes", 0)
        up.append(tu / 1e6)
        down.append(td / 1e6)
        dp.append(tp / 1e6)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, up, marker="o", label="federation: up (updates)")
    ax.plot(xs, down, marker="s", label="federation: down (global weights)")
    if tp:
        ax.plot(xs, dp, color="tab:red", linestyle="--",
                label="data-parallel, equal tokens (fp32 all-reduce every step)")
        ax.set_yscale("symlog", linthresh=1.0)  # both curves readable, however far apart
    ax.set_xlabel("round")
    ax.set_ylabel("MB on the wire (cumulative)")
    ax.set_title("Bytes on the wire: federation vs data-parallel")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_site_tokens(records: list[dict], path: Path) -> None:
    """Tokens each site trained (accepted updates only)."""
    tokens: dict[str, int] = defaultdict(int)
    for r in records:
        if r["kind"] == "site" and r.get("accepted"):
            tokens[r["site"]] += r["tokens"]
    names = sorted(tokens)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, [tokens[n] / 1e6 for n in names], color="tab:green")
    ax.set_ylabel("tokens trained (millions)")
    ax.set_title("Tokens per site")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def final_table(records: list[dict]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The domains evaluated and, per run, its last validation loss of each domain."""
    last: dict[str, dict[str, float]] = {}
    for r in records:
        if r["kind"] == "round" and r.get("val_loss"):
            last[r["run"]] = r["val_loss"]
    domains = sorted({d for v in last.values() for d in v})
    return domains, last


def _contributors_html(run_dir: Path) -> str:
    """The contributors' shares from the run's ledger, once it verifies."""
    from atoll.app.books import LEDGER
    from atoll.ledger.chain import verify_ledger
    from atoll.ledger.credit import shares

    path = run_dir / LEDGER
    if not path.exists():
        return "<p>no ledger in this run folder</p>"
    verdict = verify_ledger(path)
    if not verdict.ok:
        return f"<p><b>the ledger does not verify</b>: {html.escape(str(verdict))}</p>"
    rows = "".join(
        f"<tr><td>{html.escape(s.contributor)}</td><td>{html.escape(', '.join(s.sites))}</td>"
        f"<td>{s.tokens:,}</td><td>{s.value:.4f}</td><td><b>{s.share:.1%}</b></td></tr>"
        for s in shares(verdict.read))
    return (f"<table><tr><th>contributor</th><th>sites</th><th>tokens trained</th>"
            f"<th>value</th><th>share</th></tr>{rows}</table><p>From <code>{LEDGER}</code> "
            f"({verdict.entries} entries, chain and signatures verified). Value: each "
            f"update's first-order drop in validation loss, split by tokens; share: rounds "
            f"counted alike (<code>atoll shares</code>).</p>")


def write_report(run_dir: str | Path) -> Path:
    """Make ``plots/*.png`` and ``report.html`` in ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir}: no metrics.jsonl records to report")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot_validation(records, plots / "validation_loss.png")
    plot_bytes(records, plots / "bytes_on_wire.png")
    plot_site_tokens(records, plots / "site_tokens.png")
    path = run_dir / "report.html"
    write_atomic(path, _page(run_dir, records).encode())
    return path


def _losses_html(records: list[dict]) -> str:
    """The final validation loss table: a row per run (federation first), a column per
    domain and the mean."""
    domains, last = final_table(records)
    runs = sorted(last, key=lambda n: (n != FEDERATION, n))
    head = "".join(f"<th>{html.escape(d)}</th>" for d in domains)
    rows = []
    for run in runs:
        cells = "".join(f"<td>{last[run].get(d, float('nan')):.4f}</td>" for d in domains)
        mean = mean_loss(last[run])
        rows.append(f"<tr><td>{html.escape(run)}</td>{cells}<td><b>{mean:.4f}</b></td></tr>")
    return f"<table><tr><th>run</th>{head}<th>mean</th></tr>{''.join(rows)}</table>"


def _rejected_html(fed: list[dict]) -> str:
    """One list item per refused update (or evaluation report): its round, site, reason."""
    rejected = [(r["round"], s, why) for r in fed for s, why in (r.get("rejected") or {}).items()]
    rejected += [(r["round"], s, f"evaluation report: {why}") for r in fed
                 for s, why in (r.get("eval_refused") or {}).items()]
    return "".join(f"<li>round {n}: {html.escape(s)}: {html.escape(w)}</li>"
                   for n, s, w in rejected) or "<li>none</li>"


def _privacy_html(fed: list[dict], records: list[dict]) -> str:
    """The privacy budget spent, round by round, or that the run had none; and every change
    of its settings on a resume."""
    private = [r for r in fed if r.get("epsilon") is not None]
    changes = "".join(
        f"<p><b>Privacy settings changed when the run resumed after round {r['round']}:</b> "
        f"{html.escape(json.dumps(r['from']))} &rarr; {html.escape(json.dumps(r['to']))}</p>"
        for r in records if r["kind"] == "privacy")
    if not private:
        return changes + "<p>No differential privacy in this run.</p>"
    last = private[-1]["epsilon"]
    spent = (f"epsilon {last:.3g}" if math.isfinite(last) else
             "epsilon unbounded (a round without noise followed private rounds)")
    return changes + (f"<p>Site-level differential privacy: {spent} at "
                      f"delta {private[-1]['delta']:g} after {len(private)} rounds "
                      f"(per round: " + ", ".join(f"{r['epsilon']:.3g}" for r in private)
                      + ").</p>")


def _dp_html(fed: list[dict]) -> str:
    """The data-parallel yardstick of the federation's bytes, when the run recorded it."""
    dp = sum(r.get("dp_bytes", 0) for r in fed)
    moved = sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in fed)
    if not dp or not moved:
        return ""
    return (f"; data-parallel training at equal tokens would have moved {dp / 1e6:,.1f} MB "
            f"(an fp32 all-reduce among the sites after every step): <b>{dp / moved:.1f}x "
            f"fewer bytes</b>")


def _page(run_dir: Path, records: list[dict]) -> str:
    """The whole report page; the plots it shows are already under ``plots/``."""
    fed = _rounds(records, FEDERATION)
    total_up = sum(r.get("bytes_up", 0) for r in fed)
    total_down = sum(r.get("bytes_down", 0) for r in fed)
    config = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").exists() else ""
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>atoll run {html.escape(info.get('run_id', ''))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>atoll run {html.escape(info.get('name', ''))}
<small>{html.escape(info.get('run_id', ''))}</small></h1>
<p>{len(fed) - 1} rounds, {fed[-1]['tokens']:,} tokens trained into the global model,
{total_up / 1e6:.1f} MB up and {total_down / 1e6:.1f} MB down on the wire{_dp_html(fed)}.</p>
<h2>Final validation loss (nats/token)</h2>
{_losses_html(records)}
<p>Baselines are centralised training on the union of the sites' data at equal tokens:
<i>data_parallel</i> combines the sites' batches for the same number of steps;
<i>sequential</i> takes one site's batch for steps &times; sites steps.</p>
<h2>Validation loss per domain</h2><img src="plots/validation_loss.png">
<h2>Bytes on the wire</h2><img src="plots/bytes_on_wire.png">
<h2>Tokens per site</h2><img src="plots/site_tokens.png">
<h2>Rejected updates</h2><ul>{_rejected_html(fed)}</ul>
<h2>Privacy</h2>{_privacy_html(fed, records)}
<h2>Who contributed what</h2>{_contributors_html(run_dir)}
<h2>Configuration</h2><pre>{html.escape(config)}</pre>
</body></html>"""
