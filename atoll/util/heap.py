"""Freed large buffers go back to the operating system at once (glibc's allocator).

The coordinator decodes each update one tensor at a time: megabytes to hundreds of
megabytes, allocated and freed once per tensor per site. glibc serves a freed block above
its mmap threshold straight back to the system, but it *raises* that threshold to the size
of every such block freed (up to 32 MiB), so from then on tensors below 32 MiB come from
the heap, whose free space is kept and fragments: measured on the 125m preset, the peak
grew by one update's size per site folded in (bench/coordinator_memory.py). Fixing the
threshold at 1 MiB turns the dynamic rule off: every tensor of that size is its own
mapping, returned when freed, and the peak no longer depends on how many sites report.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number (malloc.h)."""


def return_large_frees_to_os(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of at least ``threshold`` bytes with its own mapping, from now
    on, in this process. True where it took effect (glibc); elsewhere nothing changes."""
    # the C library already loaded in this process: no search for it (find_library runs
    # ldconfig), and the same allocator Python and torch use
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # absent outside glibc
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
