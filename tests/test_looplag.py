"""The loop-lag monitor sees a blocked event loop, and only then."""

from __future__ import annotations

import asyncio
import time

from peerd.looplag import LoopLag


def measure(block_s: float) -> tuple[float, float, int]:
    async def scenario() -> tuple[float, float, int]:
        lag = LoopLag(tick_s=0.005)
        watcher = asyncio.create_task(lag.watch())
        await asyncio.sleep(0.1)
        time.sleep(block_s)  # a blocking step on the loop thread
        await asyncio.sleep(0.1)
        watcher.cancel()
        figures = lag.take()
        return figures.p99_s, figures.max_s, figures.ticks

    return asyncio.run(scenario())


def test_a_blocked_loop_shows_as_lag_and_an_idle_one_does_not() -> None:
    _, blocked_max, ticks = measure(0.3)
    assert blocked_max >= 0.29 and ticks >= 10
    _, idle_max, _ = measure(0.0)
    assert idle_max < 0.29


def test_take_starts_afresh() -> None:
    lag = LoopLag()
    assert lag.take().ticks == 0 and lag.take().max_s is None
