"""Drift rates from a colouring of the width groups that share a weight (msfusion, issue 23).

DESIGN invariant 3 (every weight is trained within a bounded number of rounds) needs only that
two groups which slice the same parameter on two of its axes drift at different rates: their
windows then slide past each other and every unit of one meets every unit of the other. The
groups are the nodes of a graph, an edge joins two groups named on two axes of one parameter
(read from the model's axes table, so a model sliced automatically gets its colouring too),
and a greedy colouring in table order gives each group the smallest colour its earlier
neighbours leave free: a transformer needs two rates, where rates by rank grow with the number
of groups (docs/ALGORITHM.md, drift rates from a colouring).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

Axes = Mapping[str, tuple[str | None, ...]]  # parameter -> the group slicing each axis


def sharing_graph(groups: Sequence[str], axes: Axes) -> dict[str, set[str]]:
    """Neighbours of each of `groups`: the groups of `groups` named with it on two axes of
    one parameter. Groups outside `groups` (depth, groups that do not drift) are left out."""
    chosen = set(groups)
    neighbours: dict[str, set[str]] = {group: set() for group in groups}
    for parameter_axes in axes.values():
        named = {group for group in parameter_axes if group in chosen}
        for first, second in combinations(sorted(named), 2):
            neighbours[first].add(second)
            neighbours[second].add(first)
    return neighbours


def greedy_colours(groups: Sequence[str], axes: Axes) -> dict[str, int]:
    """Colour 0, 1, ... of each of `groups`, in their order: the smallest colour that none of
    its neighbours coloured before it has, so neighbours always differ."""
    neighbours = sharing_graph(groups, axes)
    colours: dict[str, int] = {}
    for group in groups:
        taken = {colours[other] for other in neighbours[group] if other in colours}
        colours[group] = next(colour for colour in range(len(groups)) if colour not in taken)
    return colours
