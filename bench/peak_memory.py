"""A process's peak resident memory from a point on (Linux), for the memory benchmarks.

``ru_maxrss`` will not do: a process started by ``exec`` inherits its parent's peak there,
so a benchmark child of a large parent (a test worker) reads too little. Linux's own
high-water mark (``VmHWM``) belongs to the process's memory map, and writing ``5`` to
``/proc/self/clear_refs`` restarts it at what the process holds now.
"""

from __future__ import annotations


def proc_status(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status``, in bytes (Linux: KiB)."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_from_here() -> int:
    """Restart the high-water mark at what the process holds now; return that."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status("VmRSS")


def peak_since(baseline: int) -> int:
    """The peak resident bytes above ``baseline`` (from :func:`peak_from_here`)."""
    return proc_status("VmHWM") - baseline
