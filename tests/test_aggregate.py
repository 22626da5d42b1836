"""Tests of overlap aggregation (peerd.algorithm.aggregate) against a brute-force per-entry
reference.

The reference walks every flat entry of every full tensor in row-major order and decides, from
the plans' unit index sets alone (position // span in the kept units of the axis's group), who
holds it; it shares no code with peerd's masks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from support import random_plan

from peerd.algorithm.aggregate import (
    Arrival,
    Assembly,
    assemble,
    exchange_count,
    merge,
    outbox,
    staleness_weight,
)
from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.submodel import entry_mask, init_params
from peerd.algorithm.transport import InMemoryTransport, SliceMessage
from peerd.models import (
    CNNConfig,
    CNNSpec,
    ModelSpec,
    Plan,
    TransformerConfig,
    TransformerSpec,
    full_plan,
)

CNN8 = CNNSpec(CNNConfig(image_size=8, stage_widths=(32, 64)))
TINY_LM = TransformerSpec(
    TransformerConfig(
        vocab_size=20, block_size=8, n_layer=2, n_head=4, head_dim=8, d_model=32, d_ffn=64
    )
)
SPECS: dict[str, ModelSpec] = {"cnn8": CNN8, "tiny_lm": TINY_LM}

# ---- brute-force reference -------------------------------------------------------------------

UnitSets = dict[str, frozenset[int]]


def unit_sets(plan: Plan) -> UnitSets:
    return {group: frozenset(int(u) for u in units.tolist()) for group, units in plan.items()}


@cache
def shapes(spec_name: str) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in init_params(SPECS[spec_name], 0).items()}


@cache
def entries(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every multi-index of a tensor, in row-major (flat) order."""
    return list(itertools.product(*(range(size) for size in shape)))


def holds(spec: ModelSpec, units: UnitSets, name: str, index: tuple[int, ...]) -> bool:
    """Is the entry at multi-index `index` of parameter `name` in the plan's slice?"""
    for position, group_name in zip(index, spec.axes[name], strict=True):
        if group_name is None:
            continue  # an unsliced axis: every position is held
        unit = position // spec.groups[group_name].span
        if unit not in units[group_name]:
            return False
    return True


def held_flags(spec: ModelSpec, plan: Plan, name: str, shape: tuple[int, ...]) -> list[bool]:
    """Per flat entry: does the plan hold it?"""
    units = unit_sets(plan)
    return [holds(spec, units, name, index) for index in entries(shape)]


def random_params(spec_name: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        name: torch.randn(shape, generator=generator) for name, shape in shapes(spec_name).items()
    }


# ---- scenarios -------------------------------------------------------------------------------


@dataclass
class Scenario:
    spec: ModelSpec
    spec_name: str
    peers: list[str]
    now: dict[str, Plan]
    next: dict[str, Plan]
    weights: dict[str, float]
    params: dict[str, dict[str, torch.Tensor]]
    receiver: str
    neighbours: list[str]


def make_scenario(spec_name: str, kind: str, seed: int) -> Scenario:
    spec = SPECS[spec_name]
    generator = torch.Generator().manual_seed(seed)
    count = 2 + seed % 4  # 2..5 peers
    peers = [f"peer{i}" for i in range(count)]
    if kind == "random":
        now = {p: random_plan(spec, generator) for p in peers}
        nxt = {p: random_plan(spec, generator) for p in peers}
    else:
        # Any two widths add up past 1, so neighbours always share entries to merge.
        widths = [0.5, 0.625, 0.75, 0.875]
        members = [
            Member(p, widths[int(torch.randint(0, 4, (1,), generator=generator))]) for p in peers
        ]
        planner = make_planner(kind, seed)
        # Windows drift every round, so the receiver's next slice reaches beyond the
        # neighbours' current windows.
        round_index = 10 * seed + 9
        now = planner.plan(round_index, members, spec.groups)
        nxt = planner.plan(round_index + 1, members, spec.groups)
    weights = {p: float(torch.rand(1, generator=generator)) * 99 + 1 for p in peers}
    params = {p: random_params(spec_name, generator) for p in peers}
    receiver = peers[int(torch.randint(0, count, (1,), generator=generator))]
    others = [p for p in peers if p != receiver]
    keep = torch.rand(len(others), generator=generator) < 0.7
    neighbours = [p for p, k in zip(others, keep.tolist(), strict=True) if k] or others[:1]
    return Scenario(spec, spec_name, peers, now, nxt, weights, params, receiver, neighbours)


# Seeds pick the peer count (2 + seed % 4): the CNN (77k entries) at 2 and 5 peers, the tiny
# transformer at every count from 2 to 5.
SEEDS = {"cnn8": (0, 3), "tiny_lm": (0, 1, 2, 3)}
CASES = [
    pytest.param(spec_name, kind, seed, id=f"{spec_name}-{kind}-{seed}")
    for spec_name, seeds in SEEDS.items()
    for kind in ("random", "msfusion")
    for seed in seeds
]


def arrivals_for(s: Scenario) -> list[Arrival]:
    return [
        Arrival(
            s.now[n],
            s.weights[n],
            outbox(s.spec, s.params[n], s.now[n], s.now[s.receiver], s.next[s.receiver]),
        )
        for n in s.neighbours
    ]


# ---- 1. outbox -------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec_name", "kind", "seed"), CASES)
def test_outbox_sends_what_the_receiver_holds_now_or_next(
    spec_name: str, kind: str, seed: int
) -> None:
    s = make_scenario(spec_name, kind, seed)
    receiver = s.receiver
    transport = InMemoryTransport()
    for sender in s.neighbours[:2]:
        values = outbox(s.spec, s.params[sender], s.now[sender], s.now[receiver], s.next[receiver])
        assert set(values) == set(s.spec.axes)
        expected_count = 0
        for name, shape in shapes(spec_name).items():
            sender_holds = held_flags(s.spec, s.now[sender], name, shape)
            receiver_now = held_flags(s.spec, s.now[receiver], name, shape)
            receiver_next = held_flags(s.spec, s.next[receiver], name, shape)
            flat = s.params[sender][name].reshape(-1).tolist()
            expected = [
                flat[i]
                for i in range(len(flat))
                if sender_holds[i] and (receiver_now[i] or receiver_next[i])
            ]
            assert values[name].dim() == 1
            assert values[name].dtype == torch.float32
            assert values[name].numel() == len(expected), name
            assert torch.equal(values[name], torch.tensor(expected, dtype=torch.float32)), name
            assert exchange_count(s.spec, name, torch.Size(shape), s.now[sender],
                                  s.now[receiver], s.next[receiver]) == len(expected), name
            expected_count += len(expected)
        message = SliceMessage(sender, receiver, seed, s.weights[sender], values)
        assert message.payload_bytes() == 4 * expected_count
        before = transport.bytes_sent[sender]
        transport.send(message)
        assert transport.bytes_sent[sender] - before == 4 * expected_count


def test_outbox_is_empty_when_the_receiver_holds_nothing_of_the_sender() -> None:
    spec = CNN8
    params = init_params(spec, 0)
    sender = {name: torch.arange(0, g.units // 2) for name, g in spec.groups.items()}
    receiver = {name: torch.arange(g.units // 2, g.units) for name, g in spec.groups.items()}
    values = outbox(spec, params, sender, receiver, receiver)
    # Only tensors with no sliced axis (the head bias) are shared by disjoint plans.
    for name, vector in values.items():
        sliced = any(group is not None for group in spec.axes[name])
        assert vector.numel() == (0 if sliced else params[name].numel()), name


# ---- 2. merge --------------------------------------------------------------------------------


def reference_merge(s: Scenario) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Per entry: the weighted mean over holders among self (if it holds the entry now) and the
    neighbours whose message carries it; entries nobody sent keep the local value. Also returns
    per entry a category: "kept" (nobody sent), "now" (held now by the receiver), "next"
    (not held now, held next round)."""
    receiver = s.receiver
    merged: dict[str, list[float]] = {}
    categories: dict[str, list[str]] = {}
    for name, shape in shapes(s.spec_name).items():
        own_now = held_flags(s.spec, s.now[receiver], name, shape)
        own_next = held_flags(s.spec, s.next[receiver], name, shape)
        senders = {n: held_flags(s.spec, s.now[n], name, shape) for n in s.neighbours}
        own_values = s.params[receiver][name].reshape(-1).tolist()
        sender_values = {n: s.params[n][name].reshape(-1).tolist() for n in s.neighbours}
        out, kinds = [], []
        for i, own_value in enumerate(own_values):
            carried = [n for n in s.neighbours if senders[n][i] and (own_now[i] or own_next[i])]
            if not carried:
                out.append(own_value)
                kinds.append("kept")
                continue
            total = sum(s.weights[n] * sender_values[n][i] for n in carried)
            weight = sum(s.weights[n] for n in carried)
            if own_now[i]:
                total += s.weights[receiver] * own_value
                weight += s.weights[receiver]
            out.append(total / weight)
            kinds.append("now" if own_now[i] else "next")
        merged[name] = out
        categories[name] = kinds
    return merged, categories


@pytest.mark.parametrize(("spec_name", "kind", "seed"), CASES)
def test_merge_is_the_weighted_mean_over_holders(spec_name: str, kind: str, seed: int) -> None:
    s = make_scenario(spec_name, kind, seed)
    receiver = s.receiver
    local = {name: t.clone() for name, t in s.params[receiver].items()}
    arrivals = arrivals_for(s)
    merge(s.spec, local, s.now[receiver], s.next[receiver], s.weights[receiver], arrivals)
    expected, categories = reference_merge(s)
    seen = set()
    for name, tensor in local.items():
        flat = tensor.reshape(-1)
        reference = torch.tensor(expected[name], dtype=torch.float32)
        kinds = categories[name]
        kept = torch.tensor([k == "kept" for k in kinds])
        seen.update(kinds)
        # Entries nobody sent keep the local value bit for bit.
        assert torch.equal(flat[kept], s.params[receiver][name].reshape(-1)[kept]), name
        torch.testing.assert_close(flat, reference, rtol=1e-5, atol=1e-6, msg=name)
    # The scenario exercises the merge at all: something arrived and was averaged.
    assert seen & {"now", "next"}


def test_merge_categories_all_occur() -> None:
    """Across the msfusion and random scenarios every kind of entry shows up, so the reference
    comparisons above cover kept, held-now and held-next-only entries."""
    seen: set[str] = set()
    for spec_name, kind, seed in [("tiny_lm", "random", 1), ("tiny_lm", "msfusion", 2)]:
        _, categories = reference_merge(make_scenario(spec_name, kind, seed))
        seen.update(k for kinds in categories.values() for k in kinds)
    assert seen == {"kept", "now", "next"}


def halves(spec: ModelSpec, first: bool) -> Plan:
    return {
        name: torch.arange(0, g.units // 2) if first else torch.arange(g.units // 2, g.units)
        for name, g in spec.groups.items()
    }


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_merge_own_value_counts_only_where_held_now(spec_name: str) -> None:
    """Receiver holds the first half of every group now and the second half next round; two
    senders hold everything. The receiver's (huge) own values must enter the mean on its
    current slice and nowhere else."""
    spec = SPECS[spec_name]
    generator = torch.Generator().manual_seed(3)
    own = {name: torch.full(shape, 1e3) for name, shape in shapes(spec_name).items()}
    first = random_params(spec_name, generator)
    second = random_params(spec_name, generator)
    own_now, own_next, everything = halves(spec, True), halves(spec, False), full_plan(spec)
    w_own, w_first, w_second = 2.0, 3.0, 5.0
    arrivals = [
        Arrival(everything, w_first, outbox(spec, first, everything, own_now, own_next)),
        Arrival(everything, w_second, outbox(spec, second, everything, own_now, own_next)),
    ]
    merged = {name: t.clone() for name, t in own.items()}
    merge(spec, merged, own_now, own_next, w_own, arrivals)
    neither_count = 0
    for name, tensor in merged.items():
        now_mask = entry_mask(spec, own_now, name, tensor.shape)
        next_mask = entry_mask(spec, own_next, name, tensor.shape) & ~now_mask
        neither = ~(now_mask | next_mask)
        senders_mean = (w_first * first[name] + w_second * second[name]) / (w_first + w_second)
        with_own = (w_own * own[name] + w_first * first[name] + w_second * second[name]) / 10.0
        torch.testing.assert_close(tensor[now_mask], with_own[now_mask], msg=name)
        torch.testing.assert_close(tensor[next_mask], senders_mean[next_mask], msg=name)
        assert torch.equal(tensor[neither], own[name][neither]), name
        if any(g is not None for g in spec.axes[name]):
            assert bool(next_mask.any()), name
        neither_count += int(neither.sum())
    # Weights over two sliced axes have entries in one half along one axis and the other half
    # along the other: held neither now nor next, so nobody sends them.
    assert neither_count > 0


# ---- 2b. late slices (semi-asynchronous rounds) -------------------------------------------


def test_staleness_weight_is_polynomial_decay() -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == 0.5  # (1 + 3)^-0.5
    assert staleness_weight(1, 2.0) == 0.25
    assert staleness_weight(7, 0.0) == 1.0  # exponent 0: no decay
    with pytest.raises(ValueError, match="negative"):
        staleness_weight(-1, 0.5)


@pytest.mark.parametrize(("spec_name", "kind", "seed"), CASES)
def test_a_late_slice_enters_only_entries_held_now_with_its_staleness_weight(
    spec_name: str, kind: str, seed: int
) -> None:
    """A slice built in an earlier round (its own sender plan, and the receiver's plans of
    that round) is merged along with this round's slices: per entry, it counts where its
    round's exchange carried the entry and the receiver holds the entry now, with weight
    w * (1 + s)^-a. Reference: per entry, from the plans alone."""
    s = make_scenario(spec_name, kind, seed)
    receiver = s.receiver
    generator = torch.Generator().manual_seed(100 + seed)
    late_sender = s.neighbours[0]
    late_params = random_params(spec_name, generator)
    sender_then = random_plan(s.spec, generator)
    then_now, then_next = random_plan(s.spec, generator), random_plan(s.spec, generator)
    staleness, exponent = 2, 0.5
    late_weight = s.weights[late_sender] * (1 + staleness) ** -exponent
    late = Arrival(sender_then, late_weight,
                   outbox(s.spec, late_params, sender_then, then_now, then_next),
                   (then_now, then_next))
    local = {name: t.clone() for name, t in s.params[receiver].items()}
    merge(s.spec, local, s.now[receiver], s.next[receiver], s.weights[receiver],
          [*arrivals_for(s), late])
    touched = 0
    for name, shape in shapes(spec_name).items():
        own_now = held_flags(s.spec, s.now[receiver], name, shape)
        own_next = held_flags(s.spec, s.next[receiver], name, shape)
        senders = {n: held_flags(s.spec, s.now[n], name, shape) for n in s.neighbours}
        late_sent = [a and (b or c) for a, b, c in zip(
            held_flags(s.spec, sender_then, name, shape),
            held_flags(s.spec, then_now, name, shape),
            held_flags(s.spec, then_next, name, shape), strict=True)]
        own_values = s.params[receiver][name].reshape(-1).tolist()
        late_values = late_params[name].reshape(-1).tolist()
        expected = []
        for i, own_value in enumerate(own_values):
            total, weight = 0.0, 0.0
            for n in s.neighbours:
                if senders[n][i] and (own_now[i] or own_next[i]):
                    total += s.weights[n] * s.params[n][name].reshape(-1)[i].item()
                    weight += s.weights[n]
            if late_sent[i] and own_now[i]:
                total += late_weight * late_values[i]
                weight += late_weight
                touched += 1
            if weight == 0:
                expected.append(own_value)
                continue
            if own_now[i]:
                total += s.weights[receiver] * own_value
                weight += s.weights[receiver]
            expected.append(total / weight)
        torch.testing.assert_close(local[name].reshape(-1),
                                   torch.tensor(expected, dtype=torch.float32),
                                   rtol=1e-5, atol=1e-6, msg=name)
    assert touched > 0


def test_late_merge_by_hand() -> None:
    """Two units per group: the receiver holds unit 0 now and unit 1 next; a late slice of a
    sender that held everything, sent when the receiver held everything. Only unit 0's entries
    take the late value: (2 * own + 6 * (1 + 3)^-0.5 * late) / (2 + 3) = (2 * 1 + 3 * 11) / 5
    = 7; every other entry, including unit 1's (held next, not now), keeps its value."""
    spec = TransformerSpec(TransformerConfig(vocab_size=3, block_size=2, n_layer=1, n_head=2,
                                             head_dim=1, d_model=2, d_ffn=2))
    everything = full_plan(spec)
    first = {name: torch.tensor([0]) for name in spec.groups}
    second = {name: torch.tensor([1]) for name in spec.groups}
    own = {name: torch.ones(shape) for name, shape in
           ((n, t.shape) for n, t in init_params(spec, 0).items())}
    late_values = {name: torch.full_like(t, 11.0) for name, t in own.items()}
    late = Arrival(everything, 6.0 * staleness_weight(3, 0.5),
                   outbox(spec, late_values, everything, everything, everything),
                   (everything, everything))
    merged = {name: t.clone() for name, t in own.items()}
    merge(spec, merged, first, second, 2.0, [late])
    for name, tensor in merged.items():
        held = entry_mask(spec, first, name, tensor.shape)
        assert torch.equal(tensor[held], torch.full_like(tensor[held], 7.0)), name
        assert torch.equal(tensor[~held], own[name][~held]), name


# ---- 3. full plans, equal weights, fully connected -------------------------------------------


@pytest.mark.parametrize(("spec_name", "count"), [("cnn8", 2), ("tiny_lm", 3), ("tiny_lm", 5)])
def test_full_plans_fully_connected_give_everyone_the_mean(spec_name: str, count: int) -> None:
    spec = SPECS[spec_name]
    generator = torch.Generator().manual_seed(count)
    peers = [f"peer{i}" for i in range(count)]
    plans = make_planner("full", 0).plan(0, [Member(p, 1.0) for p in peers], spec.groups)
    params = {p: random_params(spec_name, generator) for p in peers}
    mean = {name: sum(params[p][name] for p in peers) / count for name in shapes(spec_name)}
    # All messages are composed before anyone merges, as in a synchronous round.
    inbox = {
        receiver: [
            Arrival(
                plans[sender],
                1.0,
                outbox(spec, params[sender], plans[sender], plans[receiver], plans[receiver]),
            )
            for sender in peers
            if sender != receiver
        ]
        for receiver in peers
    }
    merged = {p: {name: t.clone() for name, t in params[p].items()} for p in peers}
    for p in peers:
        merge(spec, merged[p], plans[p], plans[p], 1.0, inbox[p])
    for name in mean:
        for p in peers:
            torch.testing.assert_close(merged[p][name], mean[name], rtol=0, atol=1e-6)
            torch.testing.assert_close(merged[p][name], merged[peers[0]][name], rtol=0, atol=1e-6)


# ---- 4. assemble -----------------------------------------------------------------------------


@pytest.mark.parametrize(("spec_name", "kind", "seed"), CASES)
def test_assemble_is_the_mean_over_this_rounds_holders(
    spec_name: str, kind: str, seed: int
) -> None:
    s = make_scenario(spec_name, kind, seed)
    assembled = assemble(s.spec, s.params, s.now)
    assert set(assembled) == set(s.spec.axes)
    nobody_total = 0
    for name, shape in shapes(spec_name).items():
        held = {p: held_flags(s.spec, s.now[p], name, shape) for p in s.peers}
        values = {p: s.params[p][name].reshape(-1).tolist() for p in s.peers}
        expected = []
        for i in range(len(values[s.peers[0]])):
            holders = [p for p in s.peers if held[p][i]]
            if not holders:
                nobody_total += 1
            pool = holders or s.peers
            expected.append(sum(values[p][i] for p in pool) / len(pool))
        torch.testing.assert_close(
            assembled[name].reshape(-1), torch.tensor(expected), rtol=1e-5, atol=1e-6, msg=name
        )
    if kind == "msfusion" and seed == 0:
        # Two peers of width <= 0.5 cannot cover every unit: some entries have no holder.
        assert nobody_total > 0


def test_assemble_with_nobody_holding_takes_the_mean_over_all_peers() -> None:
    spec = TINY_LM
    generator = torch.Generator().manual_seed(0)
    peers = ["a", "b", "c"]
    params = {p: random_params("tiny_lm", generator) for p in peers}
    nothing_but_one: Plan = {name: torch.tensor([0]) for name in spec.groups}
    plans = {p: nothing_but_one for p in peers}
    plans["c"] = {name: torch.tensor([1]) for name in spec.groups}
    assembled = assemble(spec, params, plans)
    # wte.weight: columns (embd units) 0 held by a and b, 1 held by c, the rest by nobody.
    wte = {p: params[p]["wte.weight"] for p in peers}
    result = assembled["wte.weight"]
    torch.testing.assert_close(result[:, 0], (wte["a"][:, 0] + wte["b"][:, 0]) / 2)
    assert torch.equal(result[:, 1], wte["c"][:, 1])
    everyone = (wte["a"][:, 2:] + wte["b"][:, 2:] + wte["c"][:, 2:]) / 3
    torch.testing.assert_close(result[:, 2:], everyone)


def test_an_assembly_gives_its_result_once_and_keeps_no_sums() -> None:
    """The sums are dropped as the result is built (the cluster watcher's peak memory), so a
    second result or a later peer is refused by name rather than computed from nothing."""
    s = make_scenario("tiny_lm", "msfusion", 0)
    assembly = Assembly(s.spec)
    for peer in s.peers:
        assembly.add(s.params[peer], s.now[peer])
    result = assembly.result()
    expected = assemble(s.spec, s.params, s.now)
    assert result.keys() == expected.keys()
    assert all(torch.equal(result[name], expected[name]) for name in expected)
    assert assembly.total == assembly.holders == assembly.everyone == {}
    with pytest.raises(ValueError, match="taken already"):
        assembly.result()
    with pytest.raises(ValueError, match="taken already"):
        assembly.add(s.params[s.peers[0]], s.now[s.peers[0]])
