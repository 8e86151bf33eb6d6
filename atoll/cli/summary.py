"""What a finished run prints: validation loss per domain against the baselines, the
contributors' shares and where the model and report are."""

from __future__ import annotations

from typing import TYPE_CHECKING

from atoll.app.books import LEDGER
from atoll.app.metrics import FEDERATION, mean_loss, read_metrics
from atoll.ledger.chain import read_entries
from atoll.ledger.credit import shares

if TYPE_CHECKING:
    from atoll.app.run import Run


def print_summary(run: Run) -> None:
    """The closing lines of ``atoll simulate`` and ``atoll demo``."""
    _print_losses(run.final_losses())
    _print_bytes(run)
    if (run.out / LEDGER).exists():
        table = shares(read_entries(run.out / LEDGER))
        print("\nshare of the model (ledger: " + str(run.out / LEDGER) + ")")
        print("  " + ", ".join(f"{s.contributor} {s.share:.1%}" for s in table))
    if run.grid is None:
        print(f"\nmodel: {run.out / 'model'} (AutoModelForCausalLM.from_pretrained)")
    else:
        print(f"\nmodel: {run.out / 'model'}: every path a Hugging Face model (p0-0/ ...) and "
              f"the router; atoll generate {run.out} --prompt TEXT")
    print(f"report: {run.out / 'report.html'}")


def _print_bytes(run: Run) -> None:
    """The federation's bytes on the wire against data-parallel training's at equal tokens."""
    rounds = [r for r in read_metrics(run.out / "metrics.jsonl")
              if r["kind"] == "round" and r["run"] == FEDERATION]
    up = sum(r.get("bytes_up", 0) for r in rounds)
    down = sum(r.get("bytes_down", 0) for r in rounds)
    dp = sum(r.get("dp_bytes", 0) for r in rounds)
    print(f"\nbytes on the wire: federation {megabytes(up + down)} ({megabytes(up)} up, "
          f"{megabytes(down)} down)", end="")
    if dp and up + down:
        print(f"; data-parallel training at equal tokens {megabytes(dp)} (fp32 all-reduce "
              f"every step): {dp / (up + down):.1f}x fewer bytes")
    else:
        print()


def megabytes(n: float) -> str:
    """``n`` bytes in MB, as the summary and the report print them."""
    return f"{n / 1e6:,.1f} MB"


def _print_losses(final: dict[str, dict[str, float]]) -> None:
    """One row per domain and a mean row; a column per run, the baselines' means also
    relative to the federation's."""
    fed = final.get(FEDERATION, {})
    others = [k for k in final if k != FEDERATION]
    print("\nfinal validation loss (nats/token) per domain")
    print(f"  {'domain':<14}{'federation':>12}" + "".join(f"{k:>26}" for k in others))
    for d in sorted(fed):
        row = f"  {d:<14}{fed[d]:>12.4f}"
        for k in others:
            row += f"{final[k].get(d, float('nan')):>26.4f}"
        print(row)
    if fed:
        mean = mean_loss(fed)
        row = f"  {'mean':<14}{mean:>12.4f}"
        for k in others:
            m = mean_loss(final[k])
            row += f"{m:>18.4f} ({(mean / m - 1) * 100:+.1f}%)"
        print(row)
