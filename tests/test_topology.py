from __future__ import annotations

from pathlib import Path

import pytest

from peerd.algorithm.topology import bundled_topologies, load_topology

MEMBERS = ["a", "b", "c", "d", "e"]


def test_bundled_topologies() -> None:
    assert bundled_topologies() == ["full", "ring"]
    ring, full = load_topology("ring"), load_topology("full")
    assert ring.neighbours(MEMBERS, "a") == ("b", "e")
    assert ring.neighbours(MEMBERS, "c") == ("b", "d")
    assert full.neighbours(MEMBERS, "c") == ("a", "b", "d", "e")
    assert ring.neighbours(["b", "a"], "a") == ("b",)  # two peers: one neighbour, once
    assert ring.neighbours(["a"], "a") == ()


def test_user_topology_file(tmp_path: Path) -> None:
    path = tmp_path / "wide.toml"
    path.write_text('name = "wide-ring"\nneighbour_offsets = [-2, -1, 1, 2]\n')
    topology = load_topology(str(path))
    assert topology.name == "wide-ring"
    assert topology.neighbours([*MEMBERS, "f"], "a") == ("b", "c", "e", "f")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("neighbour_offsets = [0, 1]\n", "non-zero integers"),
        ("neighbour_offsets = [1]\nfully_connected = true\n", "exactly one"),
        ("fully_connected = false\n", "exactly one"),
        ("neighbours = [1]\n", "unknown keys"),
        ("neighbour_offsets = [1\n", "not valid TOML"),
    ],
)
def test_bad_topology_files_are_named_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_topology(str(path))


def test_unknown_topology_names_the_bundled_ones() -> None:
    with pytest.raises(ValueError, match="full, ring"):
        load_topology("star")
    with pytest.raises(ValueError, match="not among the members"):
        load_topology("ring").neighbours(MEMBERS, "z")
