"""The semi-asynchronous round deadline: median + k MAD of recent arrival delays, clamped."""

from __future__ import annotations

import pytest

from peerd.algorithm.deadline import DELAYS_KEPT, ArrivalDelays


def test_no_estimate_waits_up_to_the_ceiling() -> None:
    delays = ArrivalDelays(mads=4, floor_s=0.25, ceiling_s=300)
    delays.record(0.5)
    delays.record(0.5)
    assert delays.deadline_s() == 300


def test_median_plus_k_mads_by_hand() -> None:
    delays = ArrivalDelays(mads=4, floor_s=0.25, ceiling_s=300)
    for delay in (1.0, 2.0, 3.0, 4.0, 100.0):  # one outlier
        delays.record(delay)
    # median 3; deviations 2, 1, 0, 1, 97 -> MAD 1; 3 + 4 * 1 = 7: the outlier barely counts
    assert delays.deadline_s() == pytest.approx(7.0)


def test_clamped_to_floor_and_ceiling_and_negative_delays_count_as_zero() -> None:
    early = ArrivalDelays(mads=4, floor_s=0.25, ceiling_s=300)
    for _ in range(5):
        early.record(-1.0)  # the slice was there before this peer was ready
    assert early.deadline_s() == 0.25
    slow = ArrivalDelays(mads=4, floor_s=0.25, ceiling_s=10)
    for delay in (20.0, 30.0, 40.0):
        slow.record(delay)
    assert slow.deadline_s() == 10


def test_only_recent_delays_count() -> None:
    delays = ArrivalDelays(mads=0, floor_s=0.01, ceiling_s=300)
    for _ in range(DELAYS_KEPT):
        delays.record(50.0)
    for _ in range(DELAYS_KEPT // 2 + 1):
        delays.record(1.0)
    assert delays.deadline_s() == 1.0
