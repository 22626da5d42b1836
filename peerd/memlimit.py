"""A kernel memory limit for one process: a cgroup v1 memory controller group of its own.

`peerd cluster --memory-limit SIZE` starts each daemon in such a group, so that a daemon that
would hold more than a small device's memory is killed by the kernel (the OOM killer), not
merely reported: the proof that the cluster trains a model no member could train alone.
The group is made below the cgroup this process runs in (root may do so), its limit written
before the daemon starts, and the daemon enters it between fork and exec.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


class MemoryLimitError(RuntimeError):
    """No cgroup v1 memory controller here, or no right to make a group in it."""


def _own_group() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MEMORY_ROOT / path.lstrip("/")
    raise MemoryLimitError("this process is in no cgroup v1 memory group "
                           "(/proc/self/cgroup names none): --memory-limit needs one")


def own_headroom_bytes() -> int | None:
    """What this process's cgroup v1 memory group still allows it (limit less charge); None
    without such a group or without a limit below the machine's memory."""
    try:
        group = _own_group()
        limit = int((group / "memory.limit_in_bytes").read_text())
        usage = int((group / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError, MemoryLimitError):
        return None
    # An unlimited group reports a page-rounded 2^63 - 1.
    return None if limit >= 1 << 62 else limit - usage


@dataclass(frozen=True)
class MemoryGroup:
    path: Path

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> MemoryGroup:
        """A fresh group `name` below this process's own, limited to `limit_bytes` (no swap
        beyond it where the kernel accounts swap)."""
        if not MEMORY_ROOT.is_dir():
            raise MemoryLimitError(f"{MEMORY_ROOT} is missing: --memory-limit needs the cgroup "
                                   f"v1 memory controller")
        path = _own_group() / name
        try:
            if path.exists():
                path.rmdir()  # a group left by an earlier run; refused while it has processes
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            swap = path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit_bytes))
        except OSError as error:
            raise MemoryLimitError(f"cannot set up memory group {path}: {error.strerror}"
                                   ) from None
        return cls(path)

    def enter(self) -> None:
        """Move the calling process into the group (a child's preexec_fn, before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def oom_kills(self) -> int:
        """Processes the kernel killed for this group's limit (0 on kernels that do not say)."""
        for line in self._read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def max_usage_bytes(self) -> int:
        """The group's peak charge: resident memory plus the page cache it caused."""
        return int(self._read("memory.max_usage_in_bytes"))

    def remove(self) -> None:
        """Delete the group once its processes have exited."""
        # Still busy, or gone: the kernel keeps a busy group harmlessly until then.
        with contextlib.suppress(OSError):
            self.path.rmdir()
