"""Which entries of the full model have been trained at least once (DESIGN invariant 3)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

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
