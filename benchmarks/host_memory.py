"""Resident memory of the process, and giving freed CPU memory back to the OS (glibc): the
benchmarks' helpers (the library itself needs neither).

Compression allocates factors of many sizes, and glibc's malloc keeps freed blocks in its heap.
An early version grew by ~100 MB per MiniLM + LoRA step; the LoRAct callback then called
``malloc_trim(0)`` after every CPU step. Since the reference-cycle leak was fixed (see
``_Forward.pack`` in loract_lightning/context.py), resident memory stays flat without it (0.11 MiB per step over 120
steps, ``python benchmarks/host_memory_growth.py``), while the call cost ~160 ms a step (13%),
so the callback no longer makes it. :func:`release_free_memory` stays for loops whose resident
memory does grow.
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
