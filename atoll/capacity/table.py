"""The planner's table: one column per planned federation, one row per figure."""

from __future__ import annotations

from collections.abc import Callable

from atoll.capacity.memory import GIB
from atoll.capacity.network import format_rate
from atoll.capacity.plan import Plan

Row = tuple[str, Callable[[Plan], str]]


def size(n: float) -> str:
    """Bytes in decimal units, as links count them: ``12.3 MB``, ``4.56 GB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def gib(n: float) -> str:
    """Bytes of memory in GiB (MiB below one GiB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def count(n: float) -> str:
    """A number of tokens: ``1.05B``, ``262k``."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def duration(s: float) -> str:
    """Seconds as people read them: ``42.0 s``, ``3.5 min``, ``7.2 h``, ``12.3 days``."""
    for unit, scale in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if s >= 2 * scale:
            return f"{s / scale:.1f} {unit}"
    return f"{s:.3g} s"


def _memory(p: Plan) -> str:
    cap = f" of {p.memory_gib:g} GiB" if p.memory_gib else ""
    return gib(p.memory.total) + cap + ("" if p.fits else " (DOES NOT FIT)")


def _mfu(p: Plan) -> str:
    if not p.mfu:
        return "measured speed"
    return f"{p.mfu:.0%} " + ("implied" if p.cfg.tokens_per_second else "assumed")


def _link(p: Plan) -> str:
    down = p.cfg.downlink or p.cfg.uplink
    text = format_rate(p.cfg.uplink) + ("" if down == p.cfg.uplink else
                                        f" up, {format_rate(down)} down")
    return text + (f", {p.cfg.latency * 1e3:g} ms" if p.cfg.latency else "")


def _reduction(p: Plan) -> str:
    return f"{p.reduction:,.0f}x" if p.cfg.sites > 1 else "n/a (one site)"


ROWS: list[Row] = [
    ("model", lambda p: f"{p.cfg.model_name} ({count(p.params)} params)"),
    ("sites x GPUs", lambda p: f"{p.cfg.sites} x {p.cfg.gpus_per_site} {p.cfg.gpu} "
                               f"({p.parallel})"),
    ("link (each site)", _link),
    ("batch x seq_len, H", lambda p: f"{p.cfg.batch_size * p.cfg.grad_accum} x "
                                     f"{p.cfg.seq_len}, {p.cfg.steps_per_round}"),
    ("-- per device --", lambda p: ""),
    ("weights (fp32)", lambda p: gib(p.memory.weights)),
    ("grads (fp32)", lambda p: gib(p.memory.grads)),
    ("AdamW state", lambda p: gib(p.memory.optimizer)),
    ("activations", lambda p: gib(p.memory.activations)),
    ("total", _memory),
    ("-- per site, per round --", lambda p: ""),
    ("training FLOPs/token", lambda p: f"{p.flops_per_token:.3g}"),
    ("MFU", _mfu),
    ("tokens/s", lambda p: f"{p.tokens_per_second:,.0f}"),
    ("compute", lambda p: duration(p.compute_s)),
    ("bytes up", lambda p: f"{size(p.traffic.up)} ({p.cfg.up.spec})"),
    ("bytes down", lambda p: f"{size(p.traffic.down)} ({p.cfg.down.spec})"),
    ("transfer", lambda p: duration(p.transfer_s)),
    ("round, no overlap", lambda p: duration(p.round_s)),
    ("round, overlap", lambda p: duration(p.round_s_overlap)),
    ("utilisation, no overlap", lambda p: f"{p.compute_s / p.round_s:.1%}"),
    ("utilisation, overlap", lambda p: f"{p.compute_s / p.round_s_overlap:.1%}"),
    ("data-parallel bytes", lambda p: size(p.dp_bytes)),
    ("reduction vs DP", _reduction),
    ("DP utilisation", lambda p: f"{p.compute_s / p.dp_round_s:.1%}"),
    ("-- federation --", lambda p: ""),
    ("tokens/round", lambda p: count(p.tokens_per_round)),
    ("token budget", lambda p: count(p.token_budget)),
    ("rounds", lambda p: f"{p.rounds:,}"),
    ("wall time, no overlap", lambda p: duration(p.rounds * p.round_s)),
    ("wall time, overlap", lambda p: duration(p.rounds * p.round_s_overlap)),
    ("wall time, DP", lambda p: duration(p.rounds * p.dp_round_s)),
]


def render(plans: list[Plan]) -> str:
    """The table of ``plans``, one column each, as plain aligned text."""
    label_w = max(len(label) for label, _ in ROWS)
    cells = [[fmt(p) for p in plans] for _, fmt in ROWS]
    widths = [max(len(row[i]) for row in cells) for i in range(len(plans))]
    lines = []
    for (label, _), row in zip(ROWS, cells, strict=True):
        if label.startswith("--"):
            lines.append(label)
            continue
        lines.append(f"{label:<{label_w}}  " + "  ".join(
            f"{c:>{w}}" for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)
