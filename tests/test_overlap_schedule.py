"""msfusion's overlap schedule: every unit covered in every round at every level, the overlap
between neighbouring windows falls as the level decays, static is the plain DSS layout, and
every weight entry of a real model still gets trained."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.algorithm.coverage import CoverageTracker
from peerd.algorithm.plan import Member, MSFusionPlanner, make_planner, overlap_level, window_width
from peerd.algorithm.submodel import init_params
from peerd.cli import build_parser
from peerd.config import ConfigError, SimConfig
from peerd.models.base import UnitGroup
from peerd.models.cnn import CNNConfig, CNNSpec


def _members(mu_values: list[float]) -> list[Member]:
    return [Member(f"peer-{index:02d}", mu) for index, mu in enumerate(mu_values)]


def _windows(planner: MSFusionPlanner, round_index: int, members: list[Member],
             group: UnitGroup) -> list[set[int]]:
    plans = planner.plan(round_index, members, {group.name: group})
    return [{int(u) for u in plans[m.peer_id][group.name]} for m in members]


def _is_arc(window: set[int], units: int) -> bool:
    width = len(window)
    if width == units:
        return True
    start = next(u for u in window if (u - 1) % units not in window)
    return window == {(start + offset) % units for offset in range(width)}


@settings(max_examples=80, deadline=None)
@given(
    units=st.integers(min_value=1, max_value=64),
    mu_values=st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=1, max_size=16),
    halflife=st.floats(min_value=0.5, max_value=20.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    round_indices=st.lists(st.integers(min_value=0, max_value=200), min_size=1, max_size=6),
)
def test_decaying_overlap_covers_every_unit_at_every_round(
    units: int, mu_values: list[float], halflife: float, seed: int, round_indices: list[int]
) -> None:
    group = UnitGroup("g", units, 2)
    members = _members(mu_values)
    widths = [window_width(mu, units) for mu in mu_values]
    planner = MSFusionPlanner(seed, overlap=f"decay:{halflife}")
    for round_index in [*round_indices, 0, 10_000]:
        windows = _windows(planner, round_index, members, group)
        assert [len(w) for w in windows] == widths
        assert all(_is_arc(w, units) for w in windows)
        union = set().union(*windows)
        if sum(widths) >= units:
            assert union == set(range(units)), (round_index, widths)
        else:
            assert len(union) == sum(widths)  # disjoint, as with the static layout


def _overlap_with_next(windows: list[set[int]]) -> list[int]:
    return [len(windows[i] & windows[(i + 1) % len(windows)]) for i in range(len(windows))]


def test_overlap_between_neighbours_decays_by_the_schedule() -> None:
    group = UnitGroup("g", 16, 1)
    members = _members([0.25] * 8)  # windows of 4 units, W = 2K
    decaying = MSFusionPlanner(3, overlap="decay:4")
    static = MSFusionPlanner(3)
    # Level 1 (round 0): the even spread, half a window shared with the next peer.
    assert _overlap_with_next(_windows(decaying, 0, members, group)) == [2] * 8
    # Level 1/2 (round 4): stride 3, overlap 1 (the last window wraps onto the first).
    assert _overlap_with_next(_windows(decaying, 4, members, group))[:7] == [1] * 7
    # Level ~0 (round 200): edge to edge, peers n and n + 4 hold the same window.
    late = _windows(decaying, 200, members, group)
    assert _overlap_with_next(late) == [0] * 8
    assert all(late[n] == late[n + 4] for n in range(4))
    for round_index in (0, 4, 200):
        assert _overlap_with_next(_windows(static, round_index, members, group)) == [2] * 8
    assert [overlap_level("decay:4", r) for r in (0, 4, 8)] == [1.0, 0.5, 0.25]
    assert overlap_level("static", 1000) == 1.0


def test_decay_round_zero_and_static_are_the_plain_dss_layout() -> None:
    spec = CNNSpec(CNNConfig(image_size=8, stage_widths=(16, 32)))
    members = _members([0.25, 0.5, 0.125, 0.25, 0.25])
    plain = MSFusionPlanner(9).plan(0, members, spec.groups)
    decaying = make_planner("msfusion", 9, overlap="decay:2").plan(0, members, spec.groups)
    for member in members:
        for name in spec.groups:
            assert torch.equal(plain[member.peer_id][name], decaying[member.peer_id][name])


def test_every_weight_entry_trains_under_the_decaying_schedule() -> None:
    spec = CNNSpec(CNNConfig(image_size=8, stage_widths=(16, 32)))
    tracker = CoverageTracker(spec, init_params(spec, 0))
    planner = MSFusionPlanner(0, overlap="decay:2")
    members = _members([0.25] * 8)
    for round_index in range(60):
        tracker.record(planner.plan(round_index, members, spec.groups).values())
    assert tracker.untrained() == {}
    assert tracker.fraction == 1.0


@pytest.mark.parametrize("schedule", ["decay", "decay:0", "decay:-3", "decay:nan", "grow:5", ""])
def test_bad_schedules_are_refused_with_the_option_named(schedule: str) -> None:
    with pytest.raises(ConfigError, match=r"overlap=.* is invalid: must be static or decay:H"):
        SimConfig(overlap=schedule)
    with pytest.raises(ConfigError, match="overlap="):
        MSFusionPlanner(0, overlap=schedule)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sim", "--overlap", schedule])
