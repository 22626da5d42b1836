"""The round driver: each slice is checked once, expected counts are computed once per (round,
sender), and slices it must not take are refused by name before they reach the inbox."""

from __future__ import annotations

from collections import Counter

import pytest

from peerd.algorithm.driver import SliceRefused
from peerd.algorithm.engine import Engine
from peerd.algorithm.transport import SliceMessage
from peerd.config import SimConfig, TrainConfig
from peerd.sim import build, run_round

CONFIG = SimConfig(peers=4, rounds=2, topology="full", mu=(0.5,), out="unused",
                   train=TrainConfig(max_local_steps=1))


def count_calls(engine: Engine, name: str, calls: Counter) -> None:
    method = getattr(engine, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[(engine.peer_id, name)] += 1
        return method(*args, **kwargs)

    setattr(engine, name, counted)


def test_each_slice_is_checked_once_and_counted_once_per_sender() -> None:
    sim = build(CONFIG)
    calls: Counter = Counter()
    for engine in sim.engines:
        for name in ("check_message", "expected_counts"):
            count_calls(engine, name, calls)
    for round_index in range(2):
        run_round(sim, round_index)
    senders = len(sim.engines) - 1  # full mesh: every other peer sends each peer a slice
    for engine in sim.engines:
        assert calls[(engine.peer_id, "check_message")] == 2 * senders
        assert calls[(engine.peer_id, "expected_counts")] == 2 * senders


def test_slices_the_driver_must_not_take_are_refused_by_name() -> None:
    sim = build(CONFIG)
    run_round(sim, 0)
    receiver, sender = sim.drivers[0], sim.drivers[1]
    ctx = sender.context(1)
    message = next(m for m in sender.engine.outbox(ctx) if m.receiver == receiver.peer_id)
    receiver.round_index = 1
    name = next(iter(message.values))
    poisoned = SliceMessage(message.sender, message.receiver, message.round_index,
                            message.weight, {**message.values,
                                             name: message.values[name] * float("nan")})
    with pytest.raises(SliceRefused) as invalid:
        receiver.accept(poisoned, poisoned.payload_bytes())
    assert invalid.value.reason == "invalid" and "non-finite" in invalid.value.detail
    weightless = SliceMessage(message.sender, message.receiver, message.round_index,
                              float("nan"), message.values)
    with pytest.raises(SliceRefused) as unweighted:
        receiver.accept(weightless, weightless.payload_bytes())
    assert unweighted.value.reason == "invalid" and "weight nan" in unweighted.value.detail
    receiver.accept(message, message.payload_bytes())  # refused ones left no trace
    with pytest.raises(SliceRefused) as twice:
        receiver.accept(message, message.payload_bytes())
    assert twice.value.reason == "duplicate"
    with pytest.raises(SliceRefused) as ahead:
        receiver.admit(3, sender.peer_id, message.weight)
    assert ahead.value.reason == "later"
    with pytest.raises(SliceRefused) as old:
        receiver.admit(0, sender.peer_id, message.weight)  # strict rounds: their own only
    assert old.value.reason == "stale"
    with pytest.raises(SliceRefused) as stranger:
        receiver.admit(1, "peer-99", message.weight)
    assert stranger.value.reason == "stranger"
    # The weight divides the merge's sums: refused at admission, over either transport.
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(SliceRefused) as weightless:
            receiver.admit(1, sender.peer_id, weight)
        assert weightless.value.reason == "invalid" and "weight" in weightless.value.detail
