"""Keep large CPU buffers in the heap instead of fresh mmaps (glibc).

A decode step gathers each layer's keys and values into buffers of several MB. Above
glibc's mmap threshold every such buffer is a new mapping whose pages fault on first
touch, and freeing it unmaps them again: at batch 32 and 400 tokens of context a step
took 971 ms that way and 272 ms with the threshold at its maximum (32 MB) and the heap
no longer trimmed after each step. Elsewhere (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems
TRIM_THRESHOLD = 1 << 30  # give memory back to the OS only when this much is free at the top


def keep_buffers_in_heap() -> bool:
    """True when glibc took the settings."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
