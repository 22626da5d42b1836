"""`peerd cluster` sent SIGTERM (kill, systemd) stops its daemons instead of orphaning them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def processes_naming(text: str) -> list[int]:
    """The pids whose command line contains `text` (the run's own directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def test_sigterm_stops_the_daemons_too(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cluster = subprocess.Popen(
        [sys.executable, "-m", "peerd.cli", "cluster", "--peers", "2", "--rounds", "10000",
         "--no-mdns", "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        rounds = out / "peer-00" / "rounds.jsonl"
        deadline = time.monotonic() + 300
        while not (rounds.exists() and rounds.read_text().strip()):
            assert cluster.poll() is None, cluster.communicate()
            assert time.monotonic() < deadline, "no round within 300 s"
            time.sleep(0.5)
        daemons = [pid for pid in processes_naming(str(out / "peer-")) if pid != cluster.pid]
        assert len(daemons) == 2, daemons
        cluster.send_signal(signal.SIGTERM)
        _, stderr = cluster.communicate(timeout=120)
    finally:
        if cluster.poll() is None:
            cluster.kill()
    assert cluster.returncode == 2, stderr
    assert "stopped by SIGTERM; its daemons were stopped too" in stderr
    assert "Traceback" not in stderr
    assert processes_naming(str(out / "peer-")) == []
