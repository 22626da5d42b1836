"""What the machine alone does to an event loop: a process whose loop does nothing but measure
its lag (peerd/looplag.py, the daemons' own monitor) while the daemons under test run. On a
loaded machine an idle loop wakes late too; a daemon's lag beyond that is the daemon's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WINDOW_S = 2.0  # about a round of the small tests under load: a p99 per window

PROBE = r'''
import asyncio, json, signal, sys, time
from peerd.looplag import LoopLag

async def main():
    lag = LoopLag()
    watcher = asyncio.create_task(lag.watch())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with open(sys.argv[1], "a") as out:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), float(sys.argv[2]))
            except TimeoutError:
                pass
            figures = lag.take()
            if figures.ticks:
                out.write(json.dumps([time.time(), figures.p99_s, figures.max_s]) + "\n")
                out.flush()
    watcher.cancel()

print("measuring", flush=True)
asyncio.run(main())
'''


@dataclass(frozen=True)
class IdleLoopLag:
    worst_window_p99_s: float  # the highest p99 of any window
    max_s: float
    windows: int


class LagProbe:
    """Runs the probe from start() to stop()."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", PROBE, str(self.out),
                                         str(WINDOW_S)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "measuring"

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0
        assert self.process.stdout is not None
        self.process.stdout.close()


    def kill(self) -> None:
        """Ends it if it still runs (a test that failed before stop)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def read_idle_loop_lag(out: Path, since: float, until: float) -> IdleLoopLag:
    """The figures a probe wrote to `out` in the windows that overlap `since` to `until`
    (wall-clock seconds: the rounds, not the daemons' start, when four processes import
    torch at once and an idle loop waited up to 0.96 s at load 20)."""
    windows = [json.loads(line) for line in out.read_text().splitlines()]
    during = [(p99, top) for ended, p99, top in windows if since <= ended <= until + WINDOW_S]
    assert during, f"the probe measured nothing from {since} to {until}: {windows}"
    return IdleLoopLag(max(p99 for p99, _ in during), max(top for _, top in during),
                       len(during))
