"""Typed configuration with validation that names the offending option and its allowed values.

Defaults come from the task (peerd/tasks.py) and are overridden by what the user passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
    train: TrainConfig | None = None  # None: the task's defaults (peerd/tasks.py)

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


@dataclass(frozen=True)
class DaemonConfig:
    """One daemon (`peerd start`)."""

    topology: str = "ring"
    task: str = "digits"
    mu: float = 0.5
    method: str = "msfusion"
    host: str = "0.0.0.0"
    port: int = 7470
    peers: tuple[str, ...] = ()  # static HOST:PORT addresses, for networks without multicast
    mdns: bool = True
    mdns_interface: str | None = None
    cluster: str = "default"
    state_dir: str = "peerd-state"
    peer_id: str | None = None  # default: the id persisted in state_dir
    shard: tuple[int, int] | None = None  # (index, count) of the bundled data's shards
    partition: str = "iid"
    data_dir: str | None = None
    rounds: int | None = None  # None: run until stopped
    min_peers: int = 2
    seed: int = 0
    threads: int | None = None  # torch threads; None: torch's default (all cores)
    round_timeout_s: float = 300.0
    linger_s: float = 0.0  # keep serving pulls this long after the last round
    metrics_port: int | None = None  # Prometheus endpoint; None: off

    def __post_init__(self) -> None:
        _require(0 < self.mu <= 1, "mu", self.mu, "in (0, 1]")
        _require(0 <= self.port <= 65535, "port", self.port, "in 0..65535 (0: any free port)")
        _require(self.min_peers >= 1, "min_peers", self.min_peers, ">= 1")
        _require(self.rounds is None or self.rounds >= 1, "rounds", self.rounds, ">= 1")
        _require(bool(self.cluster) and len(self.cluster) <= 64, "cluster", self.cluster,
                 "1 to 64 characters")
        _require(self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1")
        _require(self.round_timeout_s > 0, "round_timeout_s", self.round_timeout_s, "> 0")
        _require(self.linger_s >= 0, "linger_s", self.linger_s, ">= 0")
        _require(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port",
                 self.metrics_port, "in 0..65535, or unset for no endpoint")
        if self.shard is not None:
            index, count = self.shard
            _require(0 <= index < count, "shard", f"{index}/{count}", "I/N with 0 <= I < N")


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N': the I-th (from 0) of N deterministic shards of the task's bundled data."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ConfigError(f"shard={text!r} is invalid: write I/N, e.g. 0/4") from None
    _require(0 <= index < count, "shard", text, "I/N with 0 <= I < N")
    return index, count
