"""Typed configuration with validation that names the offending option and its allowed values.

Defaults come from the task (peerd/tasks.py) and are overridden by what the user passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad option value; the message names the option and what is allowed."""


@dataclass(frozen=True)
class TrainConfig:
    """Local training of one sub-model in one round (SGD, fresh optimizer state each round)."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    local_epochs: int = 1
    max_local_steps: int | None = None  # caps a round's steps on large shards
    grad_clip: float | None = None  # max gradient norm; transformers diverge without it

    def __post_init__(self) -> None:
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a positive number")
        _require(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.local_epochs >= 1, "local_epochs", self.local_epochs, ">= 1")
        _require(
            self.max_local_steps is None or self.max_local_steps >= 1,
            "max_local_steps", self.max_local_steps, ">= 1 or unset",
        )
        _require(
            self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip,
            "a positive number or unset",
        )


@dataclass(frozen=True)
class SimConfig:
    peers: int = 4
    topology: str = "ring"
    method: str = "msfusion"
    mu: tuple[float, ...] = (0.5,)  # one value for all peers, or one per peer (cycled)
    task: str = "digits"
    rounds: int = 30
    seed: int = 0
    partition: str = "iid"
    data_dir: str | None = None
    out: str = "runs/sim"
    eval_every: int = 1
    eval_samples: int | None = None  # global test samples per evaluation; None: the task default
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(self.peers >= 1, "peers", self.peers, ">= 1")
        _require(self.rounds >= 1, "rounds", self.rounds, ">= 1")
        _require(self.eval_every >= 1, "eval_every", self.eval_every, ">= 1")
        _require(len(self.mu) >= 1, "mu", self.mu, "at least one value")
        for mu in self.mu:
            _require(0 < mu <= 1, "mu", mu, "in (0, 1]")
        _require(
            self.eval_samples is None or self.eval_samples >= 1,
            "eval_samples", self.eval_samples, ">= 1",
        )

    def peer_mu(self, position: int) -> float:
        return self.mu[position % len(self.mu)]


def _require(condition: bool, option: str, value: object, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{option}={value!r} is invalid: must be {allowed}")


def parse_mu(text: str) -> tuple[float, ...]:
    """'0.5' for every peer, or '0.125,0.25,0.5' assigned to peers by position, cycled."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"mu={text!r} is invalid: give a number or a comma list") from None
    for mu in values:
        _require(0 < mu <= 1, "mu", mu, "in (0, 1]")
    return values
