"""When a semi-asynchronous round stops waiting: an adaptive deadline from recent quorum delays.

A neighbour's *arrival delay* is how long after this peer was ready to merge (its own slice
trained and sent) the neighbour's slice of the same round arrived, 0 if it was already there.
Each round contributes one sample: the delay at which the quorum was in (the q-th smallest
arrival delay, q the quorum's count, at least 1). The deadline is median + k * MAD of the recent
samples, clamped to [floor, ceiling]. Why the quorum's delay rather than every arrival's: with
one chronic straggler among the neighbours, every arrival's delays are bimodal and their median
lands on the straggler's pace as soon as it makes a deadline, after which it always does (and
the rounds are synchronous again); the quorum's delay follows the neighbours that keep up. The
median ignores single outliers, k MADs leave room for the usual jitter, the floor for timing
noise at small scales, and the ceiling is the round timeout.
"""

from __future__ import annotations

import statistics
from collections import deque

# Recent enough to follow a change in load, enough to make a median meaningful.
DELAYS_KEPT = 32
# Below this many delays there is no estimate yet: wait up to the ceiling.
MIN_DELAYS = 3


class ArrivalDelays:
    def __init__(self, mads: float, floor_s: float, ceiling_s: float) -> None:
        self.mads = mads
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self._delays: deque[float] = deque(maxlen=DELAYS_KEPT)

    def record(self, delay_s: float) -> None:
        """One round's quorum delay."""
        self._delays.append(max(0.0, delay_s))

    def deadline_s(self) -> float:
        """Seconds after being ready to merge at which the round may close without the
        neighbours still missing."""
        if len(self._delays) < MIN_DELAYS:
            return self.ceiling_s
        median = statistics.median(self._delays)
        mad = statistics.median(abs(delay - median) for delay in self._delays)
        return min(self.ceiling_s, max(self.floor_s, median + self.mads * mad))
