"""Give freed CPU memory back to the operating system (glibc).

On the CPU, compression allocates factors of many different sizes every step. glibc's malloc
keeps freed blocks of the size it last returned with ``munmap`` in its heap instead, and the
heap fragments: on MiniLM + LoRA the process grew by ~100 MB per training step (24 GB in a
10-epoch run) without holding more tensors. ``malloc_trim(0)`` after each step returns the free
pages; measured on the same run: resident memory flat at ~1.15 GB, step time unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries and platforms."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_bytes() -> int:
    """The process's resident memory (RSS) in bytes, read from ``/proc/self/statm`` (Linux only)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
