"""The process's resident memory, as the kernel counts it: what a memory cgroup or an edge
board's RAM limits, and what `rounds.jsonl` and the metrics page report."""

from __future__ import annotations

import resource
from pathlib import Path

STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        text = STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM); getrusage's ru_maxrss where /proc has none."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def rss_bytes() -> int | None:
    """The process's resident set now (VmRSS); None where /proc has none."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024
