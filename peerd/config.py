"""Typed configuration with validation that names the offending option and its allowed values.

Defaults come from the task (peerd/tasks.py) and are overridden by what the user passes.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A bad option value; the message names the option and what is allowed."""


# Width ratio `auto`: chosen at start from a measured probe (peerd/capacity.py).
AUTO = "auto"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str, name: str = "size") -> int:
    """Bytes from '800M', '1.5G', '512MiB' or '1048576' (binary units, as systemd's)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{name}={text!r} is invalid: write a number with K, M, G or T, "
                          "e.g. 800M or 1.5G")
    size = int(float(match.group(1)) * _UNIT[match.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"{name}={text!r} is invalid: must be more than 0 bytes")
    return size


# Precisions for the exchanged values (`wire_dtype`): halving the bytes costs rounding.
WIRE_DTYPES = ("float32", "float16", "bfloat16")
STATIC_OVERLAP = "static"
# msfusion: rounds in which the first unit group's windows drift once around its ring; the r-th
# group drifts r + 1 times as fast (docs/ALGORITHM.md, drift).
DRIFT_PERIOD = 64


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
    early_exits: bool = False  # an exit head per block (depth pruning); CE on every exit
    distill_temperature: float | None = 3.0  # early exits: T of self-distillation; None: off
    # MOON-style model-contrastive term (docs/ALGORITHM.md): weight and temperature.
    contrastive: bool = False
    contrastive_weight: float = 1.0
    contrastive_tau: float = 0.5
    # CE(logits + log local label prior) in local training (docs/ALGORITHM.md, small widths).
    balanced_softmax: bool = False

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
        _require(
            self.distill_temperature is None or (
                self.distill_temperature > 0 and math.isfinite(self.distill_temperature)),
            "distill_temperature", self.distill_temperature, "a positive number or unset",
        )
        _require(self.contrastive_weight >= 0 and math.isfinite(self.contrastive_weight),
                 "contrastive_weight", self.contrastive_weight, "a number >= 0")
        _require(self.contrastive_tau > 0 and math.isfinite(self.contrastive_tau),
                 "contrastive_tau", self.contrastive_tau, "a positive number")
        if self.contrastive and self.early_exits:
            # The contrastive term reads one representation per sample; with early exits it
            # would have to choose an exit (docs/ALGORITHM.md: not combined yet).
            raise ConfigError("contrastive=True is invalid with early_exits=True: the "
                              "contrastive term is not combined with early exits")
        if self.balanced_softmax and (self.contrastive or self.early_exits):
            raise ConfigError("balanced_softmax=True is invalid with contrastive or "
                              "early_exits: it is measured alone (docs/ALGORITHM.md)")


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
    label_column: str = "label"  # the CSV column holding the class (task tabular)
    out: str = "runs/sim"
    eval_every: int = 1
    eval_samples: int | None = None  # global test samples per evaluation; None: the task default
    train: TrainConfig | None = None  # None: the task's defaults (peerd/tasks.py), no early exits
    wire_dtype: str = "float32"
    depth: tuple[int, ...] | None = None  # blocks kept, one for all or per peer (cycled)
    # msfusion's overlap schedule: static or decay:H (peerd/algorithm/plan.py).
    overlap: str = STATIC_OVERLAP
    drift_period: int = DRIFT_PERIOD  # msfusion: rounds per turn of the slowest group's windows
    # Each peer's mean shard: the training set is first cut to a seeded peers x shard_size
    # samples (benchmarks of scale: the same data per peer whatever the peer count).
    shard_size: int | None = None
    # Data-aware width (peerd/algorithm/width.py): every peer of mu < 1 learns its widths per group.
    learned_width: bool = False
    width_epochs: int = 10
    width_penalty: float = 0.1

    def __post_init__(self) -> None:
        _require(self.peers >= 1, "peers", self.peers, ">= 1")
        check_width_options(self.width_epochs, self.width_penalty)
        parse_overlap(self.overlap)
        _require(self.drift_period >= 1, "drift_period", self.drift_period, ">= 1")
        _require(self.shard_size is None or self.shard_size >= 2, "shard_size", self.shard_size,
                 ">= 2 or unset")
        _require(self.wire_dtype in WIRE_DTYPES, "wire_dtype", self.wire_dtype,
                 f"one of {', '.join(WIRE_DTYPES)}")
        _require(self.rounds >= 1, "rounds", self.rounds, ">= 1")
        _require(self.eval_every >= 1, "eval_every", self.eval_every, ">= 1")
        _require(len(self.mu) >= 1, "mu", self.mu, "at least one value")
        for mu in self.mu:
            _require(0 < mu <= 1, "mu", mu, "in (0, 1]")
        _require(
            self.eval_samples is None or self.eval_samples >= 1,
            "eval_samples", self.eval_samples, ">= 1",
        )
        check_depth(self.depth, self.train is not None and self.train.early_exits)

    def peer_mu(self, position: int) -> float:
        return self.mu[position % len(self.mu)]

    def peer_depth(self, position: int) -> int | None:
        return None if self.depth is None else self.depth[position % len(self.depth)]


def check_width_options(epochs: int, penalty: float) -> None:
    """Options of data-aware width (peerd/algorithm/width.py): scoring epochs and the penalty
    weight."""
    _require(type(epochs) is int and epochs >= 1, "width_epochs", epochs, "an integer >= 1")
    _require(penalty > 0 and math.isfinite(penalty), "width_penalty", penalty,
             "a positive number")


def check_depth(depths: tuple[int, ...] | None, early_exits: bool,
                blocks: int | None = None) -> None:
    """Depths are block counts >= 1 (at most the model's `blocks`), and need early exits: a
    peer's deepest kept block must have an exit to train."""
    if depths is None:
        return
    for depth in depths:
        allowed = ">= 1" if blocks is None else f"in 1..{blocks} (the model's blocks)"
        _require(depth >= 1 and (blocks is None or depth <= blocks), "depth", depth, allowed)
    if not early_exits:
        raise ConfigError(f"depth={','.join(map(str, depths))} needs early_exits (--early-exits)"
                          ": a pruned peer trains the exit head of its deepest kept block")


def parse_depth(text: str) -> tuple[int, ...]:
    """'2' for every peer, or '2,1' assigned to peers by position, cycled."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"depth={text!r} is invalid: give an integer or a comma list") from None
    check_depth(values, early_exits=True)
    return values


def parse_overlap(schedule: str) -> float | None:
    """msfusion's overlap schedule: None for `static`, the half-life in rounds of `decay:H`."""
    if schedule == STATIC_OVERLAP:
        return None
    kind, _, halflife = schedule.partition(":")
    try:
        value = float(halflife)
    except ValueError:
        value = math.nan
    if kind != "decay" or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"overlap={schedule!r} is invalid: must be {STATIC_OVERLAP} or "
                          "decay:H with H > 0 rounds, e.g. decay:10")
    return value


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


WIDTH = float | str  # a width ratio or AUTO


def parse_width(text: str) -> float | str:
    """A daemon's mu: a number in (0, 1], or auto."""
    if text.strip().lower() == AUTO:
        return AUTO
    values = parse_mu(text)
    if len(values) != 1:
        raise ConfigError(f"mu={text!r} is invalid: a daemon has one width ratio, or auto")
    return values[0]


def option(default: object, help: str, flag: str | None = None) -> Any:
    """A daemon option: its default, the help text of the reference table, and its flag when
    that is not `--` + the name with dashes."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class DaemonConfig:
    """One daemon (`peerd start`): every option, in the order of the reference table."""

    topology: str = option("ring", "who exchanges slices with whom: ring, full, or a TOML path")
    task: str = option("digits", "the task: digits, fmnist, kjv, tabular, or a user's "
                       "FILE.py:FUNCTION (docs/MODELS.md); the same on every member")
    mu: float | str = option(
        0.5, "width ratio of this peer's slice, in (0, 1]; auto: the widest of 0.5, 0.25, "
        "0.125, 0.0625 that fits memory_budget (and round_target) by a probe at start")
    memory_budget: str | None = option(
        None, "with mu auto: memory the whole daemon may use, e.g. 800M or 1.5G (default: "
        "what it uses at start plus what the kernel reports available)")
    round_target_s: float | None = option(
        None, "with mu auto: seconds of local training a round should take at most (soft)",
        "--round-target")
    early_exits: bool = option(
        False, "an exit head after every block, CE on every exit and self-distillation; the same "
        "on every member; needed by depth and freeze")
    depth: int | None = option(
        None, "blocks this peer keeps, the shallowest (default: all; with mu auto and "
        "early_exits the probe chooses)")
    frozen_blocks: int = option(
        0, "shallowest kept blocks this peer does not train (saves gradients, optimizer state "
        "and activations; with mu auto and early_exits the probe chooses)", "--freeze")
    distill_temperature: float = option(
        3.0, "with early_exits: temperature T of self-distillation, loss CE + T^2 KL")
    distill: bool = option(
        True, "with early_exits: the deepest exit teaches the others (off: CE on every exit "
        "only)", "--no-distill")
    learned_width: bool = option(
        False, "with mu < 1: learn how many units of each group to keep on the local data "
        "(Co-S2P), within the FLOPs of the uniform mu sub-model; announced with the capacity")
    width_epochs: int = option(10, "with learned_width: epochs of unit scoring at start")
    width_penalty: float = option(0.1, "with learned_width: weight of the FLOPs budget penalty")
    method: str = option("msfusion", "planner: msfusion, fedrolex, heterofl, fd or full")
    overlap: str = option(
        STATIC_OVERLAP, "msfusion: how much neighbouring windows overlap, static or decay:H "
        "(the overlap halves every H rounds); the same on every member")
    drift_period: int = option(
        DRIFT_PERIOD, "msfusion: rounds in which the first unit group's windows drift once "
        "around; the r-th group drifts r + 1 times as fast; the same on every member")
    contrastive: bool = option(
        False, "MOON-style model-contrastive term in local training (5/3 of the training FLOPs)")
    contrastive_weight: float = option(1.0, "with contrastive: its weight lambda")
    contrastive_tau: float = option(0.5, "with contrastive: its temperature tau")
    host: str = option("0.0.0.0", "address gRPC listens on")
    port: int = option(7470, "gRPC port (0: any free port)")
    peers: tuple[str, ...] = option(
        (), "a peer's HOST:PORT, for networks without multicast (repeatable)", "--peer")
    mdns: bool = option(True, "announce this daemon and find peers by mDNS (off: peers are "
                        "found only by their --peer addresses)", "--no-mdns")
    mdns_interface: str | None = option(None, "IPv4 address of the interface mDNS uses")
    cluster: str = option("default", "cluster name: peers of other clusters are ignored")
    state_dir: str = option("peerd-state",
                            "peer id, per-round checkpoints, parameters and per-round log")
    peer_id: str | None = option(
        None, "this peer's id; with TLS it must be the certificate's name (default: the "
        "certificate's name; with --insecure, the one kept in state_dir)")
    tls_dir: str = option("peerd-tls", "holds ca.crt, device.crt and device.key "
                          "(`peerd ca issue NAME --out DIR`); see docs/SECURITY.md")
    insecure: bool = option(False, "no TLS: plain-text gRPC, anyone who reaches the port can "
                            "join, push and pull (logs a warning)")
    shard: tuple[int, int] | None = option(
        None, "I/N: train on shard I of N of the task's bundled data, I counting from 0 (three "
        "devices take 0/3, 1/3 and 2/3)")
    partition: str = option("iid", "how --shard splits the data: iid, dirichlet:ALPHA, natural")
    data_dir: str | None = option(None, "your own copy of the task's data")
    label_column: str = option("label", "with --data-dir FILE.csv (task tabular): the column "
                               "that holds the class")
    rounds: int | None = option(None, "stop after this round (default: run until stopped)")
    min_peers: int = option(2, "members needed before the first round")
    seed: int = option(0, "seeds init, data split, plans and batches; the same on every member")
    wire_dtype: str = option(
        "float32", "precision of exchanged values: float32, float16 or bfloat16; the same on "
        "every member")
    threads: int | None = option(None, "torch threads (default: all cores)")
    round_timeout_s: float = option(300.0, "seconds to wait for the neighbours' slices",
                                    "--round-timeout")
    dead_after_s: float = option(
        10.0, "seconds a member may go unheard before the others drop it from the view",
        "--dead-after")
    sync: bool = option(
        False, "strict synchronous rounds: every round waits for every neighbour's slice (as "
        "`peerd sim` does); default: semi-asynchronous rounds that close at an adaptive "
        "deadline and merge late slices with a staleness weight")
    quorum: float = option(
        0.5, "semi-async: fraction of the neighbours whose slices must be in before the "
        "deadline may close a round, in [0, 1]")
    deadline_mads: float = option(
        4.0, "semi-async: a round waits the median recent arrival delay plus this many median "
        "absolute deviations", "--deadline-mads")
    deadline_floor_s: float = option(
        0.25, "semi-async: the shortest deadline in seconds (the longest is --round-timeout)",
        "--deadline-floor")
    staleness_exponent: float = option(
        0.5, "semi-async: a slice s rounds late is merged with weight (1 + s)^-a, a being this")
    max_staleness: int = option(
        4, "semi-async: a slice more than this many rounds late is dropped, never merged")
    slowdown: float = option(
        1.0, "for tests and benchmarks: local training takes this many times as long (the "
        "daemon sleeps after training); leave at 1")
    checkpoints_kept: int = option(
        3, "checkpoints kept in state_dir/checkpoints, one per round (0: none written)")
    metrics_port: int | None = option(
        None, "port of the HTTP endpoint: Prometheus /metrics, the live page / and its JSON API "
        "/api/ (docs/WEB.md; default: off)")
    metrics_host: str | None = option(
        None, "address the metrics port listens on (default: host, the gRPC address)")
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")
    linger_s: float = option(0.0, "seconds to keep serving pulls after the last round",
                             "--linger")

    def __post_init__(self) -> None:
        if self.mu != AUTO:
            _require(isinstance(self.mu, int | float) and 0 < self.mu <= 1, "mu", self.mu,
                     "in (0, 1], or auto")
        if self.memory_budget is not None:
            parse_size(self.memory_budget, "memory_budget")
        _require(self.round_target_s is None or self.round_target_s > 0, "round_target_s",
                 self.round_target_s, "> 0 or unset")
        for name in ("memory_budget", "round_target_s"):
            if self.mu != AUTO and getattr(self, name) is not None:
                raise ConfigError(f"{name}={getattr(self, name)!r} is only used with mu auto "
                                  f"(mu is {self.mu})")
        _require(self.wire_dtype in WIRE_DTYPES, "wire_dtype", self.wire_dtype,
                 f"one of {', '.join(WIRE_DTYPES)}")
        parse_overlap(self.overlap)
        _require(self.drift_period >= 1, "drift_period", self.drift_period, ">= 1")
        self._check_depth()
        self.train_config(TrainConfig())  # checks the contrastive options with early_exits
        check_width_options(self.width_epochs, self.width_penalty)
        _require(0 <= self.port <= 65535, "port", self.port, "in 0..65535 (0: any free port)")
        _require(self.min_peers >= 1, "min_peers", self.min_peers, ">= 1")
        _require(self.rounds is None or self.rounds >= 1, "rounds", self.rounds, ">= 1")
        _require(bool(self.cluster) and len(self.cluster) <= 64, "cluster", self.cluster,
                 "1 to 64 characters")
        _require(self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1")
        _require(self.round_timeout_s > 0, "round_timeout_s", self.round_timeout_s, "> 0")
        # Handshakes repeat every 0.5 s: a shorter silence is no evidence of anything.
        _require(self.dead_after_s >= 1, "dead_after_s", self.dead_after_s, ">= 1")
        _require(0 <= self.quorum <= 1, "quorum", self.quorum, "in [0, 1]")
        _require(self.deadline_mads >= 0 and math.isfinite(self.deadline_mads), "deadline_mads",
                 self.deadline_mads, "a number >= 0")
        _require(0 < self.deadline_floor_s <= self.round_timeout_s, "deadline_floor_s",
                 self.deadline_floor_s, f"> 0 and at most round_timeout_s ({self.round_timeout_s})")
        _require(self.staleness_exponent >= 0 and math.isfinite(self.staleness_exponent),
                 "staleness_exponent", self.staleness_exponent, "a number >= 0")
        _require(self.max_staleness >= 0, "max_staleness", self.max_staleness,
                 ">= 0 (0: late slices are never merged)")
        _require(self.slowdown >= 1 and math.isfinite(self.slowdown), "slowdown", self.slowdown,
                 "a number >= 1")
        _require(self.checkpoints_kept >= 0, "checkpoints_kept", self.checkpoints_kept, ">= 0")
        _require(self.linger_s >= 0, "linger_s", self.linger_s, ">= 0")
        _require(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port",
                 self.metrics_port, "in 0..65535, or unset for no endpoint")
        _require(self.log_level in LOG_LEVELS, "log_level", self.log_level,
                 f"one of {', '.join(LOG_LEVELS)}")
        if self.shard is not None:
            index, count = self.shard
            _require(0 <= index < count, "shard", f"{index}/{count}", SHARD_NUMBERING)


    def _check_depth(self) -> None:
        check_depth(None if self.depth is None else (self.depth,), self.early_exits)
        _require(self.frozen_blocks >= 0, "frozen_blocks", self.frozen_blocks, ">= 0")
        if self.frozen_blocks and not self.early_exits:
            raise ConfigError(f"frozen_blocks={self.frozen_blocks} needs early_exits "
                              "(--early-exits)")
        if self.depth is not None:
            _require(self.frozen_blocks < self.depth, "frozen_blocks", self.frozen_blocks,
                     f"less than depth ({self.depth}): at least one block must train")
        if self.mu == AUTO and self.early_exits:
            for name in ("depth", "frozen_blocks"):
                if getattr(self, name):
                    raise ConfigError(f"{name}={getattr(self, name)!r}: with mu auto and "
                                      "early_exits the probe chooses depth and frozen blocks")
        TrainConfig(distill_temperature=self.distill_temperature)  # checks the value

    def train_config(self, task_defaults: TrainConfig) -> TrainConfig:
        """The task's training defaults with this daemon's early-exit and contrastive options."""
        return replace(task_defaults, early_exits=self.early_exits,
                       distill_temperature=self.distill_temperature if self.distill else None,
                       contrastive=self.contrastive, contrastive_weight=self.contrastive_weight,
                       contrastive_tau=self.contrastive_tau)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


SHARD_NUMBERING = "I/N, shard I of N with I counting from 0 (three devices: 0/3, 1/3 and 2/3)"


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N': the I-th (from 0) of N deterministic shards of the task's bundled data."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ConfigError(f"shard={text!r} is invalid: must be {SHARD_NUMBERING}") from None
    _require(0 <= index < count, "shard", text, SHARD_NUMBERING)
    return index, count


# ---- layered daemon configuration: defaults < file < environment < flags --------------------

DEFAULT_CONFIG_FILE = Path("/etc/peerd/peerd.toml")
ENV_PREFIX = "PEERD_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def daemon_options() -> list[Field]:
    return list(fields(DaemonConfig))


def option_flag(option_field: Field) -> str:
    return option_field.metadata["flag"] or "--" + option_field.name.replace("_", "-")


def option_type(name: str) -> object:
    return get_type_hints(DaemonConfig)[name]


def _describe(kind: object) -> str:
    if kind == WIDTH:
        return "a number or auto"
    return {
        str: "text", int: "an integer", float: "a number", bool: "true or false",
        tuple[str, ...]: "a list of HOST:PORT", tuple[int, int]: "I/N",
    }[required_type(kind)]


def required_type(kind: object) -> object:
    """The type without `| None`."""
    arguments = [a for a in get_args(kind) if a is not type(None)]
    return arguments[0] if get_origin(kind) is UnionType else kind


def parse_option_text(name: str, text: str) -> object:
    """An option's value from text (an environment variable or a flag)."""
    kind = option_type(name)
    required = required_type(kind)
    if text == "" and required is not kind:
        return None
    if kind == WIDTH:
        return parse_width(text)
    if required == tuple[int, int]:
        return parse_shard(text)  # its error says how shards are numbered
    try:
        if required is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if required == tuple[str, ...]:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return required(text)
    except (ValueError, ConfigError):
        raise ConfigError(f"{name}={text!r} is invalid: must be {_describe(kind)}") from None


def _file_value(name: str, value: object, source: str) -> object:
    """An option's value from TOML, which already carries a type."""
    kind = option_type(name)
    required = required_type(kind)
    if kind == WIDTH:
        return parse_width(value if isinstance(value, str) else repr(value))
    valid = (
        (required is bool and isinstance(value, bool))
        or (required is int and isinstance(value, int) and not isinstance(value, bool))
        or (required is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (required is str and isinstance(value, str))
        or (required == tuple[str, ...] and isinstance(value, list)
            and all(isinstance(v, str) for v in value))
        or (required == tuple[int, int] and isinstance(value, str))
    )
    if not valid:
        raise ConfigError(f"{source}: {name} = {value!r} is invalid: must be {_describe(kind)}")
    if required == tuple[str, ...]:
        return tuple(value)
    if required == tuple[int, int]:
        return parse_shard(value)
    return float(value) if required is float else value


def read_config_file(path: Path) -> dict[str, object]:
    try:
        table = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    names = [f.name for f in daemon_options()]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(names)}")
    return {name: _file_value(name, value, str(path)) for name, value in table.items()}


def read_environment(environ: Mapping[str, str]) -> dict[str, object]:
    names = {ENV_PREFIX + f.name.upper(): f.name for f in daemon_options()}
    values = {}
    for variable, text in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX):
            continue
        if variable not in names:
            raise ConfigError(f"unknown environment variable {variable}; "
                              f"allowed: {', '.join(names)}")
        values[names[variable]] = parse_option_text(names[variable], text)
    return values


def load_daemon_config(
    config_file: str | None, environ: Mapping[str, str], flags: Mapping[str, object]
) -> DaemonConfig:
    """Defaults < the config file (`--config`, else /etc/peerd/peerd.toml if present) <
    PEERD_* environment variables < flags given on the command line."""
    values: dict[str, object] = {}
    if config_file is not None:
        values.update(read_config_file(Path(config_file)))
    elif DEFAULT_CONFIG_FILE.exists():
        values.update(read_config_file(DEFAULT_CONFIG_FILE))
    values.update(read_environment(environ))
    values.update(flags)
    return DaemonConfig(**values)


def reference_table() -> str:
    """docs/CONFIG.md's table, generated from DaemonConfig so that it cannot drift."""
    lines = [
        "| option (file key) | flag | environment | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for option_field in daemon_options():
        default = option_field.default
        shown = "unset" if default is None else ("[]" if default == () else repr(default))
        lines.append(
            f"| `{option_field.name}` | `{option_flag(option_field)}` | "
            f"`{ENV_PREFIX}{option_field.name.upper()}` | {shown} | "
            f"{option_field.metadata['help']} ({_describe(option_type(option_field.name))}) |"
        )
    return "\n".join(lines) + "\n"
