"""Partition specs (`iid`, `dirichlet:ALPHA`, `natural`) as text: read without numpy or torch,
so that checking a `partition` option (peerd/config.py) loads neither; peerd/data/partition.py
cuts the shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("iid", "dirichlet", "natural")
_SPEC_FORMS = "'iid', 'dirichlet:ALPHA' with a float ALPHA > 0 (e.g. 'dirichlet:0.5'), or 'natural'"


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec; ``alpha`` is set only for ``dirichlet``."""

    kind: str
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown partition kind {self.kind!r}; allowed: {_SPEC_FORMS}")
        if (self.kind == "dirichlet") != (self.alpha is not None):
            raise ValueError(f"alpha must be given for dirichlet and only for it: {self!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"dirichlet alpha must be a finite float > 0, got {self.alpha}")

    def __str__(self) -> str:
        return self.kind if self.alpha is None else f"{self.kind}:{self.alpha:g}"


def parse_partition(spec: str) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:ALPHA`` or ``natural``."""
    kind, sep, arg = spec.strip().partition(":")
    if kind in ("iid", "natural") and not sep:
        return PartitionSpec(kind)
    if kind == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return PartitionSpec(kind, alpha)
    raise ValueError(f"bad partition spec {spec!r}; allowed forms: {_SPEC_FORMS}")
