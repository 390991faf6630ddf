"""The C allocator while a RAM image cache fills: what the process holds at its peak is the cache, not twice it.

Ultralytics' RAM cache (data/base.py `_ImageCache`, 8.4.190) decodes every image into its own array, then packs
them into one contiguous tensor, freeing each array as it is copied. glibc's malloc serves a freed large block's
size from its heap from then on (its mmap threshold rises with every large block freed, up to 32 MiB on 64-bit),
and memory freed inside the heap is not returned to the system: resident memory peaked at 1.98x the cache and
stayed there into training (4,000 ppe-large photos at 416, a 1.33 GB cache: 3.18 GB peak over a 0.55 GB process,
2.95 GB after packing). With the threshold held at glibc's initial 128 KiB while the cache fills, each image is
its own mapping, returned to the system as soon as it is packed: a 1.90 GB peak (1.02x) and 1.89 GB after. After
the fill the threshold and the heap's trim threshold are set where glibc's own adjustment takes them (32 and 64 MiB),
so training allocates as it does without speedtrain. `mallopt` and `malloc_trim` are glibc's; elsewhere (musl, macOS,
Windows) nothing is changed and the plan's RAM budget counts the packing copy (planner.RAM_CACHE_FACTOR_UNTUNED).
The environment variable MALLOC_MMAP_THRESHOLD_=131072 does the same for a whole process, training included.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
FILL_MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold: every decoded image (416 px: 519 KB) is mapped
STEADY_MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where glibc's adjustment ends
STEADY_TRIM_THRESHOLD = 2 * STEADY_MMAP_THRESHOLD  # glibc moves the trim threshold with it (2x)


def tunable() -> bool:
    """Whether this process's C library is glibc, whose allocator speedtrain sets while a RAM cache fills."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if tunable() else None


def fill_start() -> bool:
    """Before a RAM cache fills: each image its own mapping, returned when it is packed. False where not glibc."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, FILL_MMAP_THRESHOLD))


def fill_end() -> None:
    """After the fill: the thresholds glibc's own adjustment would have reached, and the heap's free top returned."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
        libc.malloc_trim(0)
