"""Tests of peerd.algorithm.colouring and msfusion's drift rates `colour`: the colours of the
built-in models, neighbours always differ, and DESIGN invariant 3 (every weight entry trains
within a drift period) under colour rates."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.algorithm.colouring import greedy_colours, sharing_graph
from peerd.algorithm.coverage import CoverageTracker, rounds_until_covered
from peerd.algorithm.plan import Member, MSFusionPlanner, width_group_names, width_groups
from peerd.algorithm.submodel import init_params
from peerd.config import DRIFT_PERIOD, ConfigError, SimConfig
from peerd.models.base import ModelSpec, UnitGroup
from peerd.models.cnn import CNNConfig, CNNSpec
from peerd.models.mlp import mlp_spec
from peerd.models.transformer import TransformerConfig, TransformerSpec

DIGITS_CNN = CNNSpec(CNNConfig(image_size=8, stage_widths=(32, 64)))
FMNIST_CNN = CNNSpec(CNNConfig(image_size=28, stage_widths=(16, 32, 64), channels_per_unit=2))
KJV = TransformerSpec(TransformerConfig(vocab_size=65))
SMALL_TRANSFORMER = TransformerSpec(TransformerConfig(
    vocab_size=20, block_size=8, n_layer=2, n_head=4, head_dim=8, d_model=32, d_ffn=64))


def colours_of(spec: ModelSpec) -> dict[str, int]:
    return greedy_colours(width_group_names(spec.groups), spec.axes)


def test_the_cnns_colours() -> None:
    # A stage's mid group meets the residual widths on either side of it (conv1: previous
    # stage's residual, conv2: its own), and the shortcut joins the two residual widths.
    assert colours_of(DIGITS_CNN) == {"res0": 0, "s0b0.mid": 1, "res1": 1, "s1b0.mid": 2}
    assert colours_of(FMNIST_CNN) == {"res0": 0, "s0b0.mid": 1, "res1": 1, "s1b0.mid": 2,
                                      "res2": 0, "s2b0.mid": 2}


@pytest.mark.parametrize("early_exits", [False, True])
def test_a_transformer_needs_two_rates(early_exits: bool) -> None:
    spec = TransformerSpec(TransformerConfig(vocab_size=65, early_exits=early_exits))
    colours = colours_of(spec)
    assert colours["embd"] == 0
    assert {name: colour for name, colour in colours.items() if name != "embd"} == {
        f"l{layer}.{part}": 1 for layer in range(4) for part in ("heads", "ffn")}


def test_an_automatically_sliced_mlp_alternates() -> None:
    assert colours_of(mlp_spec(16, 3)) == {"layers.0": 0, "layers.2": 1}


def test_groups_left_out_are_not_coloured() -> None:
    """Groups that do not drift (kept whole) are left out of the graph: without res1, two
    colours do (s2b0.mid took 2 beside it)."""
    groups = [name for name in width_group_names(FMNIST_CNN.groups) if name != "res1"]
    colours = greedy_colours(groups, FMNIST_CNN.axes)
    assert colours == {"res0": 0, "s0b0.mid": 1, "s1b0.mid": 1, "res2": 0, "s2b0.mid": 1}
    assert "res1" not in sharing_graph(groups, FMNIST_CNN.axes)["s1b0.mid"]


def test_the_planner_leaves_its_whole_groups_out_of_the_colouring() -> None:
    """With the residual width whole, no heads or FFN group shares a weight with another
    windowed group: every one drifts at the slowest rate, K / R a round."""
    planner = MSFusionPlanner(0, whole_groups="embd", drift_rates="colour", spec=KJV)
    assert set(planner.colours) == set(width_group_names(KJV.groups)) - {"embd"}
    assert set(planner.colours.values()) == {0}
    plans = [planner.plan(round_index, [Member("a", 0.25)], KJV.groups)["a"]
             for round_index in (0, 1)]
    assert plans[0]["embd"].tolist() == plans[1]["embd"].tolist() == list(range(256))
    units = KJV.groups["l3.ffn"].units
    moved = (int(plans[1]["l3.ffn"][0]) - int(plans[0]["l3.ffn"][0])) % units
    assert moved == units // DRIFT_PERIOD


group_names = st.lists(st.sampled_from([f"g{i}" for i in range(8)]), min_size=1, max_size=8,
                       unique=True)


@st.composite
def axes_tables(draw: st.DrawFn) -> tuple[list[str], dict[str, tuple[str | None, ...]]]:
    groups = draw(group_names)
    axis = st.one_of(st.none(), st.sampled_from(groups))
    parameters = draw(st.lists(st.lists(axis, min_size=1, max_size=4), max_size=12))
    return groups, {f"p{index}": tuple(axes) for index, axes in enumerate(parameters)}


@given(axes_tables())
def test_groups_that_share_a_weight_never_share_a_colour(
    table: tuple[list[str], dict[str, tuple[str | None, ...]]],
) -> None:
    groups, axes = table
    colours = greedy_colours(groups, axes)
    assert set(colours) == set(groups)
    for parameter_axes in axes.values():
        named = {group for group in parameter_axes if group is not None}
        assert len({colours[group] for group in named}) == len(named), (parameter_axes, colours)
    # Greedy in table order: a group's colour is at most the number of earlier neighbours.
    neighbours = sharing_graph(groups, axes)
    for index, group in enumerate(groups):
        assert colours[group] <= len(neighbours[group] & set(groups[:index]))


@pytest.mark.parametrize("spec", [DIGITS_CNN, SMALL_TRANSFORMER], ids=["cnn", "transformer"])
def test_each_group_goes_around_colour_plus_one_times(spec: ModelSpec) -> None:
    planner = MSFusionPlanner(3, drift_rates="colour", spec=spec)
    colours = colours_of(spec)
    for rank, group in enumerate(width_groups(spec.groups)):
        rate = colours[group.name] + 1
        assert planner.drift_rate(group, rank) == rate
        offsets = [planner.group_offset(r, group, rank) for r in range(DRIFT_PERIOD + 1)]
        steps = [(after - before) % group.units for before, after in pairwise(offsets)]
        assert sum(steps) == rate * group.units
        assert max(steps) <= math.ceil(rate * group.units / DRIFT_PERIOD)


# Rounds until every entry of the model has trained (CoverageTracker), drift rates colour,
# default period 64, seed 0: within one period, as by rank (any two groups that share a weight
# slide past each other by at least one ring a period). Measured: cnn 37 and 17, transformer
# 41 and 17, for (8 peers, mu 0.25) and (4 peers, mu 0.5); by rank 39, 17, 41, 17
# (tests/test_plan.py).
COLOUR_COVERAGE_ROUNDS = {("cnn", 8): 37, ("cnn", 4): 17, ("transformer", 8): 41,
                          ("transformer", 4): 17}


def rounds_to_train_everything(spec: ModelSpec, planner: MSFusionPlanner,
                               members: list[Member]) -> int | None:
    tracker = CoverageTracker(spec, init_params(spec, 0))
    for round_index in range(DRIFT_PERIOD):
        tracker.record(planner.plan(round_index, members, spec.groups).values())
        if tracker.fraction == 1.0:
            assert tracker.untrained() == {}
            return round_index + 1
    return None


@pytest.mark.parametrize("peers", [8, 4])
@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_every_entry_trains_within_a_period_under_colour_rates(model: str, peers: int) -> None:
    spec = {"cnn": DIGITS_CNN, "transformer": SMALL_TRANSFORMER}[model]
    members = [Member(f"peer-{index:02d}", 2 / peers) for index in range(peers)]
    planner = MSFusionPlanner(0, drift_rates="colour", spec=spec)
    assert rounds_to_train_everything(spec, planner, members) == COLOUR_COVERAGE_ROUNDS[
        (model, peers)]
    for seed in range(1, 9):  # the seed sets where each group starts: still within the period
        other = MSFusionPlanner(seed, drift_rates="colour", spec=spec)
        assert rounds_until_covered(spec, other, members, DRIFT_PERIOD) is not None


def test_bad_drift_rates_are_named() -> None:
    with pytest.raises(ValueError, match="drift_rates='speed' is invalid"):
        MSFusionPlanner(0, drift_rates="speed", spec=KJV)
    with pytest.raises(ValueError, match="drift_rates=colour needs the model"):
        MSFusionPlanner(0, drift_rates="colour")
    planner = MSFusionPlanner(0, drift_rates="colour", spec=KJV)
    with pytest.raises(ValueError, match="group 'stranger' is not a width group"):
        planner.plan(1, [Member("a", 0.5)], {"stranger": UnitGroup("stranger", 8)})
    with pytest.raises(ConfigError, match="drift_rates"):
        SimConfig(drift_rates="speed")
