"""The engine's steps: outbox sizes follow the plans, merge refuses bad messages untouched."""

from __future__ import annotations

import pytest
import torch

from peerd.algorithm.aggregate import exchange_mask
from peerd.algorithm.engine import Engine, LateSlice, Staleness
from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.submodel import init_params
from peerd.algorithm.topology import load_topology
from peerd.algorithm.transport import SliceMessage
from peerd.config import TrainConfig
from peerd.data import load_task_data
from peerd.models import CNNConfig, CNNSpec

SPEC = CNNSpec(CNNConfig(image_size=8, stage_widths=(16, 32)))


def make_engines(
    count: int, method: str = "msfusion", topology: str = "ring", mu: float = 0.5,
    wire_dtype: str = "float32",
):
    data = load_task_data("digits")
    planner = make_planner(method, seed=3)
    initial = init_params(SPEC, 3)
    engines = []
    for position in range(count):
        indices = torch.arange(position, 200, count).numpy()
        engines.append(Engine(
            f"p{position}", SPEC, {n: t.clone() for n, t in initial.items()},
            data.train.subset(indices), data.test.subset(indices[:20]), planner,
            load_topology(topology), TrainConfig(lr=0.05, local_epochs=1), seed=3,
            wire_dtype=wire_dtype,
        ))
    members = [Member(e.peer_id, mu) for e in engines]
    return engines, members


def test_outbox_goes_to_topology_neighbours_with_plan_sized_payloads() -> None:
    engines, members = make_engines(5)
    sender = engines[0]
    ctx = sender.begin_round(4, members)
    messages = sender.outbox(ctx)
    assert [m.receiver for m in messages] == ["p1", "p4"]  # ring neighbours of p0 among 5
    for message in messages:
        expected = sum(
            int(exchange_mask(SPEC, name, t.shape, ctx.plans_now["p0"],
                              ctx.plans_now[message.receiver],
                              ctx.plans_next[message.receiver]).sum())
            for name, t in sender.params.items()
        )
        assert message.payload_bytes() == 4 * expected
        assert 0 < expected < sum(t.numel() for t in sender.params.values())


def test_full_method_fully_connected_merge_is_exact_fedavg() -> None:
    engines, members = make_engines(3, method="full", topology="full", mu=1.0)
    contexts = [e.begin_round(0, members) for e in engines]
    for engine, ctx in zip(engines, contexts, strict=True):
        engine.train(ctx)
    weights = torch.tensor([e.weight for e in engines])
    expected = {
        name: sum(w * e.params[name] for w, e in zip(weights, engines, strict=True))
        / weights.sum()
        for name in engines[0].params
    }
    outgoing = [m for e, ctx in zip(engines, contexts, strict=True) for m in e.outbox(ctx)]
    for engine, ctx in zip(engines, contexts, strict=True):
        engine.merge(ctx, [m for m in outgoing if m.receiver == engine.peer_id])
    for engine in engines:
        for name, value in expected.items():
            torch.testing.assert_close(engine.params[name], value, rtol=0, atol=1e-6)


def _bad_messages(good: SliceMessage) -> list[tuple[SliceMessage, str]]:
    name = next(iter(good.values))
    short = dict(good.values)
    short[name] = short[name][:-1]
    poisoned = dict(good.values)
    poisoned[name] = poisoned[name].clone()
    poisoned[name][0] = float("nan")
    missing = dict(good.values)
    del missing[name]
    fields = (good.sender, good.receiver, good.round_index, good.weight)
    return [
        (SliceMessage(good.sender, good.receiver, good.round_index + 1, good.weight,
                      good.values), "round"),
        (SliceMessage("p2", good.receiver, good.round_index, good.weight, good.values),
         "not a neighbour"),
        (SliceMessage(*fields, short), "values, the plans say"),
        (SliceMessage(*fields, poisoned), "non-finite"),
        (SliceMessage(*fields, missing), "parameter names"),
    ]


def test_merge_refuses_bad_messages_and_leaves_parameters_untouched() -> None:
    engines, members = make_engines(4)
    contexts = [e.begin_round(1, members) for e in engines]
    receiver, ctx = engines[0], contexts[0]
    good = next(m for m in engines[1].outbox(contexts[1]) if m.receiver == "p0")
    before = {n: t.clone() for n, t in receiver.params.items()}
    for bad, reason in _bad_messages(good):
        with pytest.raises(ValueError, match=reason):
            receiver.merge(ctx, [good, bad])
        for name, tensor in receiver.params.items():
            assert torch.equal(tensor, before[name]), name
    receiver.merge(ctx, [good])
    changed = sum(int((t != before[n]).sum()) for n, t in receiver.params.items())
    assert changed > 0


def _late_scenario(max_rounds: int):
    """p1's slice of round 1 for p0, and p0's own and p1's on-time slice in round 1 + gap."""
    engines, members = make_engines(4)
    for engine in engines:
        engine.staleness = Staleness(exponent=0.5, max_rounds=max_rounds)
    receiver, sender = engines[0], engines[1]
    then = [e.begin_round(1, members) for e in engines]
    sender.train(then[1])
    late = next(m for m in sender.outbox(then[1]) if m.receiver == "p0")
    return members, receiver, sender, then[0], late


@pytest.mark.parametrize("gap", [1, 4])
def test_a_late_slice_within_the_bound_is_merged(gap: int) -> None:
    members, receiver, sender, then, late = _late_scenario(max_rounds=4)
    now = receiver.begin_round(1 + gap, members)
    sender_now = sender.begin_round(1 + gap, members)
    on_time = [m for m in sender.outbox(sender_now) if m.receiver == "p0"]
    without = {n: t.clone() for n, t in receiver.params.items()}
    receiver.merge(now, on_time)
    expected_without = receiver.params
    receiver.params = {n: t.clone() for n, t in without.items()}
    assert receiver.merge(now, on_time, [LateSlice(then, late)]) == [gap]
    changed = sum(int((t != expected_without[n]).sum()) for n, t in receiver.params.items())
    assert changed > 0
    assert all(bool(t.isfinite().all()) for t in receiver.params.values())


def test_a_slice_beyond_the_staleness_bound_is_never_merged() -> None:
    members, receiver, sender, then, late = _late_scenario(max_rounds=3)
    now = receiver.begin_round(5, members)  # 4 rounds after the slice's: one too many
    on_time = [m for m in sender.outbox(sender.begin_round(5, members)) if m.receiver == "p0"]
    initial = {n: t.clone() for n, t in receiver.params.items()}
    receiver.merge(now, on_time)
    without = {n: t.clone() for n, t in receiver.params.items()}
    receiver.params = {n: t.clone() for n, t in initial.items()}
    assert receiver.merge(now, on_time, [LateSlice(then, late)]) == []
    for name, tensor in receiver.params.items():
        assert torch.equal(tensor, without[name]), name  # bit for bit: as if never received


def test_a_late_slice_is_checked_against_the_plans_of_its_own_round() -> None:
    members, receiver, _, then, late = _late_scenario(max_rounds=4)
    now = receiver.begin_round(3, members)
    before = {n: t.clone() for n, t in receiver.params.items()}
    for bad, reason in _bad_messages(late):
        with pytest.raises(ValueError, match=reason):
            receiver.merge(now, [], [LateSlice(then, bad)])
        for name, tensor in receiver.params.items():
            assert torch.equal(tensor, before[name]), name
    # The right values checked against the wrong round's plans are refused too.
    with pytest.raises(ValueError, match="round"):
        receiver.merge(now, [], [LateSlice(receiver.begin_round(2, members), late)])


def test_training_is_deterministic_and_changes_only_the_slice() -> None:
    first, members = make_engines(2)
    second, _ = make_engines(2)
    ctx = first[0].begin_round(2, members)
    before = {n: t.clone() for n, t in first[0].params.items()}
    stats_a = first[0].train(ctx)
    stats_b = second[0].train(second[0].begin_round(2, members))
    assert stats_a == stats_b
    for name, tensor in first[0].params.items():
        assert torch.equal(tensor, second[0].params[name])
        outside = ~exchange_mask(SPEC, name, tensor.shape, ctx.plans_now["p0"],
                                 ctx.plans_now["p0"], ctx.plans_now["p0"])
        assert torch.equal(tensor[outside], before[name][outside]), name
    assert stats_a.samples == 100 and stats_a.steps == 4


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_reduced_wire_precision_halves_the_bytes_and_rounds_only_the_exchange(
    wire_dtype: str,
) -> None:
    results = {}
    for dtype in ("float32", wire_dtype):
        engines, members = make_engines(3, mu=0.5, wire_dtype=dtype)
        contexts = [e.begin_round(0, members) for e in engines]
        messages = [m for e, ctx in zip(engines, contexts, strict=True) for m in e.outbox(ctx)]
        assert {v.dtype for m in messages for v in m.values.values()} == {getattr(torch, dtype)}
        engines[0].merge(contexts[0], [m for m in messages if m.receiver == "p0"])
        results[dtype] = (sum(m.payload_bytes() for m in messages), engines[0].params)
    (full_bytes, exact), (half_bytes, rounded) = results["float32"], results[wire_dtype]
    assert half_bytes * 2 == full_bytes
    for name, tensor in exact.items():
        assert rounded[name].dtype == torch.float32  # merged back in the parameters' precision
        # Off by at most the rounding of the neighbours' share of each mean.
        tolerance = 2.0 ** (-10 if wire_dtype == "float16" else -7)
        assert torch.allclose(rounded[name], tensor, rtol=tolerance, atol=1e-6), name
    assert any(not torch.equal(rounded[n], t) for n, t in exact.items())


def test_a_message_in_another_precision_is_refused() -> None:
    engines, members = make_engines(2, wire_dtype="float16")
    ctx = engines[1].begin_round(0, members)
    message = engines[1].outbox(ctx)[0]
    as_float32 = SliceMessage(message.sender, message.receiver, message.round_index,
                              message.weight, {n: v.float() for n, v in message.values.items()})
    receiver_ctx = engines[0].begin_round(0, members)
    before = {n: t.clone() for n, t in engines[0].params.items()}
    with pytest.raises(ValueError, match=r"exchanges torch\.float16"):
        engines[0].merge(receiver_ctx, [as_float32])
    assert all(torch.equal(before[n], t) for n, t in engines[0].params.items())
