"""The kernel memory limit `peerd cluster --memory-limit` puts each daemon under: a process in
its group that needs more than the limit is killed by the kernel, one within it runs on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peerd.memlimit import MEMORY_ROOT, MemoryGroup

LIMIT = 256 << 20

pytestmark = pytest.mark.skipif(
    not MEMORY_ROOT.is_dir() or os.geteuid() != 0,
    reason="needs the cgroup v1 memory controller and root")


def _allocate(group: MemoryGroup, mib: int) -> int:
    touch = f"import numpy; numpy.ones({mib} << 18, dtype=numpy.float32).sum()"
    return subprocess.run([sys.executable, "-c", touch], preexec_fn=group.enter,
                          capture_output=True).returncode


def test_a_process_beyond_its_limit_is_killed_one_within_runs() -> None:
    group = MemoryGroup.create(f"peerd-test-{os.getpid()}", LIMIT)
    try:
        assert int((group.path / "memory.limit_in_bytes").read_text()) == LIMIT
        assert _allocate(group, 64) == 0
        assert group.oom_kills() == 0
        assert _allocate(group, 512) == -9
        assert group.oom_kills() == 1
        assert LIMIT - (8 << 20) <= group.max_usage_bytes() <= LIMIT
        # `--mu auto` inside the group budgets what the group still allows.
        headroom = subprocess.run(
            [sys.executable, "-c", "from peerd.capacity import available_memory_bytes as a; "
                                   "print(a())"],
            preexec_fn=group.enter, capture_output=True, text=True, check=True).stdout
        assert 0 < int(headroom) < LIMIT
    finally:
        group.remove()
    assert not group.path.exists()
