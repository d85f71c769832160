"""glibc malloc settings that keep freed memory for the next training step.

A CPU training step frees and allocates the same large activation and gradient buffers every
time. With glibc's defaults, freed blocks above the trim threshold go back to the kernel and the
next step faults them in again, page by page (tens of thousands of minor page faults per second
in a training worker). Raising the thresholds keeps that memory in the process instead, at the
cost of a higher resident size between steps.

The environment wins: where any of glibc's own ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_TOP_PAD_`` is set, nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# blocks up to 32 MiB come from the heap (glibc's upper bound for it); up to 1 GiB of free memory at the heap's top
# is kept (mallopt takes a C int); the heap grows 512 MiB at a time
KEEP_FREED_MEMORY = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 512 << 20}
ENVIRONMENT_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse; False where it did not (not glibc, or set by env)."""
    if any(name in os.environ for name in ENVIRONMENT_SETTINGS):
        return False
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    libc = ctypes.CDLL(library)
    if not hasattr(libc, "mallopt"):  # musl, macOS
        return False
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in KEEP_FREED_MEMORY.items())
