"""How late the event loop wakes up: a sleeper asks to wake every tick and records how much
later than asked it did. Anything that blocks the loop (a scan, a copy, a file write on the
loop thread, the worker holding the GIL) shows as lag; peers' pushes, handshakes and health
checks wait that long for an answer."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

TICK_S = 0.01


@dataclass(frozen=True)
class LagFigures:
    p99_s: float | None  # None: no tick measured since the last take
    max_s: float | None
    ticks: int


class LoopLag:
    def __init__(self, tick_s: float = TICK_S) -> None:
        self.tick_s = tick_s
        self._lags: list[float] = []

    async def watch(self) -> None:
        """Measure until cancelled."""
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            self._lags.append(max(0.0, time.perf_counter() - asked - self.tick_s))

    def take(self) -> LagFigures:
        """The figures since the last take, and a fresh start."""
        lags, self._lags = self._lags, []
        if not lags:
            return LagFigures(None, None, 0)
        return LagFigures(float(np.percentile(lags, 99)), max(lags), len(lags))
