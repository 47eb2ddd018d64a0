"""Hand freed memory back to the OS (glibc): a server's RSS then follows what it holds.

The reads build large NumPy arrays for a moment (a million-step column is
8 MB) on many threadpool threads. With glibc's defaults each thread may get
its own malloc arena, and after the first large array is freed the mmap
threshold grows, so later large arrays come from the arenas and stay
resident after they are freed: measured with `benchmarks/scale_bench.py`,
the server's RSS kept climbing to ~700 MB while it held ~150 MB. Two arenas
and a fixed 1 MiB mmap threshold (large arrays mapped and unmapped whole)
keep it at what is in use. A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def limit_retained_memory(arenas: int = 2, mmap_threshold: int = 1 << 20) -> bool:
    """Set glibc's arena count and mmap threshold; True when it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_ARENA_MAX, arenas)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))
