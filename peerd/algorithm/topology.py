"""Named topologies: who a peer exchanges slices with, given the members ordered by id.

A topology file (TOML) holds either `fully_connected = true` or `neighbour_offsets`, a list
of non-zero position offsets taken modulo the number of members (a ring is [-1, 1]). The
bundled specs live in peerd/topologies/ so that they ship inside the package; a user passes
a path to a file of their own.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_KEYS = {"name", "neighbour_offsets", "fully_connected"}


@dataclass(frozen=True)
class Topology:
    name: str
    neighbour_offsets: tuple[int, ...] = ()
    fully_connected: bool = False

    def neighbours(self, members: Sequence[str], me: str) -> tuple[str, ...]:
        """The peers `me` exchanges with, in position order, never `me` itself."""
        ordered = sorted(members)
        if me not in ordered:
            raise ValueError(f"peer {me!r} is not among the members")
        if self.fully_connected:
            return tuple(peer for peer in ordered if peer != me)
        position = ordered.index(me)
        chosen = {ordered[(position + offset) % len(ordered)] for offset in self.neighbour_offsets}
        chosen.discard(me)
        return tuple(peer for peer in ordered if peer in chosen)


def bundled_topologies() -> list[str]:
    folder = resources.files("peerd") / "topologies"
    return sorted(entry.name.removesuffix(".toml") for entry in folder.iterdir()
                  if entry.name.endswith(".toml"))


def load_topology(name_or_path: str) -> Topology:
    """A bundled topology by name (ring, full) or a user's TOML file by path."""
    if name_or_path in bundled_topologies():
        text = (resources.files("peerd") / "topologies" / f"{name_or_path}.toml").read_text()
        source = f"bundled topology {name_or_path!r}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"topology {name_or_path!r} is neither a bundled one "
                f"({', '.join(bundled_topologies())}) nor a file"
            )
        text, source = path.read_text(), str(path)
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: not valid TOML: {error}") from None
    return _parse(table, source)


def _parse(table: dict, source: str) -> Topology:
    unknown = set(table) - _KEYS
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    name = table.get("name", Path(source).stem)
    fully_connected = table.get("fully_connected", False)
    offsets = table.get("neighbour_offsets", [])
    if not isinstance(fully_connected, bool):
        raise ValueError(f"{source}: fully_connected must be true or false")
    if not isinstance(offsets, list) or not all(
        isinstance(o, int) and not isinstance(o, bool) and o != 0 for o in offsets
    ):
        raise ValueError(f"{source}: neighbour_offsets must be a list of non-zero integers")
    if fully_connected == bool(offsets):
        raise ValueError(
            f"{source}: give exactly one of fully_connected = true or neighbour_offsets"
        )
    return Topology(str(name), tuple(offsets), fully_connected)
