"""Which entries of the full model have been trained at least once (DESIGN invariant 3)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from peerd.algorithm.plan import Member, Planner
from peerd.algorithm.submodel import Params, entry_mask
from peerd.models.base import ModelSpec, Plan


class CoverageTracker:
    def __init__(self, spec: ModelSpec, params: Params) -> None:
        self.spec = spec
        self.trained = {name: torch.zeros_like(t, dtype=torch.bool) for name, t in params.items()}

    def record(self, plans: Iterable[Plan]) -> None:
        for plan in plans:
            for name, trained in self.trained.items():
                trained |= entry_mask(self.spec, plan, name, trained.shape)

    @property
    def fraction(self) -> float:
        total = sum(t.numel() for t in self.trained.values())
        return sum(int(t.sum()) for t in self.trained.values()) / total

    def untrained(self) -> dict[str, int]:
        return {name: int((~t).sum()) for name, t in self.trained.items() if not t.all()}


def rounds_until_covered(spec: ModelSpec, planner: Planner, members: Sequence[Member],
                         limit: int) -> int | None:
    """Rounds from round 0 until every entry has been held by some plan (None: not within
    `limit`), on unit pairs rather than entries: an entry is held iff a plan holds the units
    of all its sliced axes (spans and unsliced axes only repeat them), so large models are
    quick; CoverageTracker answers the same (tests/test_plan.py)."""
    keys = {tuple(g for g in axes if g is not None) for axes in spec.axes.values()} - {()}
    covered = {key: np.zeros([spec.groups[g].units for g in key], bool) for key in keys}
    for round_index in range(limit):
        for plan in planner.plan(round_index, members, spec.groups).values():
            for key, mask in covered.items():
                mask[np.ix_(*[plan[g].numpy() for g in key])] = True
        if all(mask.all() for mask in covered.values()):
            return round_index + 1
    return None
