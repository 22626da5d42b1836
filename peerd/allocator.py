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
