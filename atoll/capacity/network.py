"""Links between a site and the coordinator: rates such as ``100mbit`` and latencies such
as ``80ms``, and how long a message takes on them.

Rates are decimal bits per second (``1gbit`` = 10^9 bit/s, as links are sold); a message
costs one latency plus its size over the rate. TCP slow start and loss are left out, so a
long fat link is taken at its full rate (atoll streams large messages in one connection).
"""

from __future__ import annotations

import re

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_NUMBER = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?)"


def parse_rate(text: str) -> float:
    """Bits per second of ``text``: ``100mbit``, ``1gbit``, ``10Gbit/s``, ``2.5gbps``; or
    0 for ``0``/``inf`` (no limit)."""
    t = text.strip().lower().replace(" ", "")
    if t in ("0", "inf", "unlimited"):
        return 0.0
    m = re.fullmatch(_NUMBER + r"([kmgt]?bit)(?:/s|ps)?", t.replace("bps", "bit"))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"link rate {text!r}: expected a rate such as 100mbit, 1gbit or "
                         f"10gbit")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)]


def parse_latency(text: str) -> float:
    """Seconds of one-way latency in ``text``: ``80ms``, ``0.08s``, ``500us``."""
    t = text.strip().lower().replace(" ", "")
    m = re.fullmatch(_NUMBER + r"(ms|us|s)", t)
    if not m:
        raise ValueError(f"latency {text!r}: expected a time such as 80ms or 0.08s")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def transfer_seconds(n_bytes: float, rate: float, latency: float = 0.0) -> float:
    """Seconds for ``n_bytes`` to arrive over a link of ``rate`` bit/s (0 = no limit)."""
    if n_bytes <= 0:
        return 0.0
    return latency + (8.0 * n_bytes / rate if rate else 0.0)


def format_rate(rate: float) -> str:
    """``rate`` bit/s as people write it: ``100 Mbit/s``, ``1 Gbit/s`` (``unlimited``: 0)."""
    if not rate:
        return "unlimited"
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:g} {unit}"
    return f"{rate:g} bit/s"
