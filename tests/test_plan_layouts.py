"""msfusion's window layouts (issue 23, docs/ALGORITHM.md small widths): ring (the default),
rotating (a peer takes next round the windows its ring neighbour holds now) and scattered (a
seeded order of the members per group). Each keeps DSS's unit cover and DESIGN invariant 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peerd.algorithm.coverage import CoverageTracker
from peerd.algorithm.plan import (
    LAYOUTS,
    RING_LAYOUT,
    ROTATING_LAYOUT,
    SCATTERED_LAYOUT,
    Member,
    MSFusionPlanner,
    make_planner,
)
from peerd.algorithm.submodel import entry_mask, init_params
from peerd.models.base import UnitGroup
from peerd.models.cnn import CNNConfig, CNNSpec

GROUPS = {name: UnitGroup(name, units) for name, units in (("a", 16), ("b", 32), ("c", 8))}
# A drift period so long that the windows do not drift within the rounds looked at.
STILL = 10**9


def members(count: int, mu: float = 0.25) -> list[Member]:
    return [Member(f"peer-{index:02d}", mu) for index in range(count)]


def units(plan_units: torch.Tensor) -> list[int]:
    return [int(unit) for unit in plan_units]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("count", [4, 8, 13])
def test_every_layout_covers_every_unit_with_equal_holders(layout: str, count: int) -> None:
    planner = MSFusionPlanner(3, layout=layout)
    peers = members(count)
    for round_index in (0, 1, 7, 40):
        plans = planner.plan(round_index, peers, GROUPS)
        for group in GROUPS.values():
            holders = np.zeros(group.units, int)
            for member in peers:
                window = units(plans[member.peer_id][group.name])
                assert len(window) == -(-group.units // 4)
                holders[window] += 1
            assert holders.min() >= 1, (layout, round_index, group.name)
            # Equal widths spread over the ring: holders differ by at most one across units.
            assert holders.max() - holders.min() <= 1


def test_rotating_hands_every_window_to_the_ring_neighbour() -> None:
    planner = MSFusionPlanner(0, drift_period=STILL, layout=ROTATING_LAYOUT)
    peers = members(8)
    for round_index in range(10):
        now = planner.plan(round_index, peers, GROUPS)
        later = planner.plan(round_index + 1, peers, GROUPS)
        for position, member in enumerate(peers):
            neighbour = peers[(position + 1) % len(peers)].peer_id
            for group in GROUPS:
                assert units(later[member.peer_id][group]) == units(now[neighbour][group])


def test_ring_keeps_the_windows_with_their_peers() -> None:
    planner = MSFusionPlanner(0, drift_period=STILL, layout=RING_LAYOUT)
    peers = members(8)
    first = planner.plan(0, peers, GROUPS)
    for round_index in range(1, 10):
        plans = planner.plan(round_index, peers, GROUPS)
        for member in peers:
            for group in GROUPS:
                assert units(plans[member.peer_id][group]) == units(first[member.peer_id][group])


def test_scattered_is_seeded_and_leaves_the_first_group_in_ring_order() -> None:
    peers = members(8)
    scattered = MSFusionPlanner(5, layout=SCATTERED_LAYOUT).plan(3, peers, GROUPS)
    again = MSFusionPlanner(5, layout=SCATTERED_LAYOUT).plan(3, peers, GROUPS)
    ring = MSFusionPlanner(5).plan(3, peers, GROUPS)
    other_seed = MSFusionPlanner(6, layout=SCATTERED_LAYOUT).plan(3, peers, GROUPS)
    for member in peers:
        for group in GROUPS:
            assert units(scattered[member.peer_id][group]) == units(again[member.peer_id][group])
        assert units(scattered[member.peer_id]["a"]) == units(ring[member.peer_id]["a"])
    moved = [any(units(scattered[m.peer_id][g]) != units(ring[m.peer_id][g]) for m in peers)
             for g in ("b", "c")]
    assert all(moved)
    assert any(units(scattered[m.peer_id]["b"]) != units(other_seed[m.peer_id]["b"])
               for m in peers)


CNN = CNNSpec(CNNConfig(image_size=8, stage_widths=(32, 64)))


def held_fraction(layout: str, count: int) -> float:
    params = init_params(CNN, 0)
    plans = MSFusionPlanner(0, layout=layout).plan(0, members(count), CNN.groups)
    held = total = 0
    for name, tensor in params.items():
        mask = torch.zeros(tensor.shape, dtype=torch.bool)
        for plan in plans.values():
            mask |= entry_mask(CNN, plan, name, tensor.shape)
        held += int(mask.sum())
        total += tensor.numel()
    return held / total


def test_scattered_windows_hold_more_of_the_model_as_peers_join() -> None:
    """Ring order puts a peer's blocks of a weight matrix on one diagonal band (about 2 mu of
    it, whatever N); a seeded order per group lets the held share grow with N."""
    ring = [held_fraction(RING_LAYOUT, count) for count in (8, 16)]
    scattered = [held_fraction(SCATTERED_LAYOUT, count) for count in (8, 16)]
    assert ring[1] - ring[0] < 0.1
    assert scattered[1] > scattered[0] + 0.1
    assert scattered[1] > ring[1] + 0.15


# Half the width of CNN: the coverage count is per entry and per round, and this one is cheaper.
SMALL_CNN = CNNSpec(CNNConfig(image_size=8, stage_widths=(16, 32)))


@pytest.mark.parametrize("layout", [ROTATING_LAYOUT, SCATTERED_LAYOUT])
def test_every_weight_trains_within_one_drift_period(layout: str) -> None:
    tracker = CoverageTracker(SMALL_CNN, init_params(SMALL_CNN, 0))
    planner = MSFusionPlanner(0, drift_period=32, layout=layout)
    peers = members(8)
    for round_index in range(planner.drift_period):
        tracker.record(planner.plan(round_index, peers, SMALL_CNN.groups).values())
        if tracker.fraction == 1.0:
            break
    assert tracker.untrained() == {}


def test_unknown_layout_is_named() -> None:
    with pytest.raises(ValueError, match="layout='diagonal' is invalid"):
        make_planner("msfusion", 0, layout="diagonal")
