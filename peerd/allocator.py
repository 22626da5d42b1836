"""glibc malloc settings for processes that stream large tensors.

By default glibc serves blocks over 128 KiB (growing adaptively up to 32 MiB) with fresh mmap
calls and hands freed memory at the heap's top back to the kernel, so every megabyte-sized
chunk buffer of the next stream page-faults in again. Keeping freed memory cut the minor faults
per 256 MiB stream from about 55,000 to nearly none (BENCHMARKS.md, "Wire throughput").
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("peerd.allocator")

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum on 64-bit hosts
TRIM_THRESHOLD_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("not glibc: malloc thresholds left alone")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def release_freed_memory() -> bool:
    """Give every malloc arena's free pages back to the kernel (glibc's malloc_trim(0)); False
    where the C library is not glibc or nothing was released.

    With `keep_freed_memory`, what a burst of allocation frees (the `--mu auto` probe trains
    wider sub-models than the one chosen) stays resident in the arena of the thread that
    freed it, and the worker thread that trains later allocates in its own arena beside it:
    memory a kernel limit counts although nothing uses it."""
    try:
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        log.debug("not glibc: no malloc_trim")
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    return bool(malloc_trim(0))
