"""One description of every option of `peerd sim`, `peerd cluster` and `peerd start`.

Each option is declared once, as a field with `option(...)` (peerd/options.py): its default, help,
flag, parsing, valid values, and whether every member must agree on it. From these fields come
the three commands' flags (peerd/cli.py), the config file, the PEERD_* variables, `peerd config`,
docs/CONFIG.md (`peerd config --reference`), the command lines `peerd cluster` starts its
daemons with, the agreement fingerprint (peerd/agreement.py) and the planner's settings.

Adding an option (docs/CONFIG.md, "Adding an option", works one through):
1. Declare it in the class whose commands have it:
   - `PeerOptions`: how a peer learns: `sim`, `cluster` and `start` (and the file, PEERD_*);
   - `DaemonOptions`: daemons only, but `peerd cluster` passes it to the daemons it starts;
   - `DaemonConfig`, `SimConfig`, `ClusterConfig`: that command only.
   `agreed=True` when every member must have the same value (it joins the fingerprint peers
   compare); `planner="msfusion"` when only that method's planner reads it (the planner's class
   takes it as a keyword; members of other methods may then differ on it); `rule=` for the
   values it allows (cross-option rules go in the class's `__post_init__`).
2. Read it where it is used: `config.NAME`, or the planner's keyword.
That is 2 files edited by hand; docs/CONFIG.md's table is then regenerated
(`peerd config --reference`).

Defaults of the training hyper-parameters come from the task (peerd/tasks.py).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

from peerd.net import DEFAULT_BULK_THRESHOLD
from peerd.options import (
    ConfigError,
    Rule,
    at_least,
    check_options,
    describe,
    field_type,
    non_negative,
    option,
    option_default,
    option_fields,
    option_flag,
    positive,
    read_table,
    read_variables,
    require,
    required_type,
    shown_default,
    spec_of,
)
from peerd.partition_spec import parse_partition

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
# msfusion: the order of the peers' windows (docs/ALGORITHM.md, small widths); ring is the
# method, the others are experiments kept for the scalability question.
WINDOW_LAYOUTS = ("ring", "scattered", "rotating")
# msfusion: rounds in which a group of rate 1 drifts once around its ring; a group of rate r
# drifts r times as fast (DRIFT_RATES; docs/ALGORITHM.md, drift).
DRIFT_PERIOD = 64
# msfusion: how fast each width group drifts, in turns around its ring per drift period: rank
# (the r-th group r + 1) or colour (a group's colour + 1 in a greedy colouring of the groups
# that share a weight; docs/ALGORITHM.md, drift rates from a colouring).
DRIFT_RATES = ("rank", "colour")
RANK_RATES, COLOUR_RATES = DRIFT_RATES
DEFAULT_DRIFT_RATES = COLOUR_RATES  # won on fmnist and kjv (BENCHMARKS.md, issue 23)


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
        require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a positive number")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        require(self.local_epochs >= 1, "local_epochs", self.local_epochs, ">= 1")
        require(
            self.max_local_steps is None or self.max_local_steps >= 1,
            "max_local_steps", self.max_local_steps, ">= 1 or unset",
        )
        require(
            self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip,
            "a positive number or unset",
        )
        require(
            self.distill_temperature is None or (
                self.distill_temperature > 0 and math.isfinite(self.distill_temperature)),
            "distill_temperature", self.distill_temperature, "a positive number or unset",
        )
        require(self.contrastive_weight >= 0 and math.isfinite(self.contrastive_weight),
                 "contrastive_weight", self.contrastive_weight, "a number >= 0")
        require(self.contrastive_tau > 0 and math.isfinite(self.contrastive_tau),
                 "contrastive_tau", self.contrastive_tau, "a positive number")
        if self.contrastive and self.early_exits:
            # The contrastive term reads one representation per sample; with early exits it
            # would have to choose an exit (docs/ALGORITHM.md: not combined yet).
            raise ConfigError("contrastive=True is invalid with early_exits=True: the "
                              "contrastive term is not combined with early exits")
        if self.balanced_softmax and (self.contrastive or self.early_exits):
            raise ConfigError("balanced_softmax=True is invalid with contrastive or "
                              "early_exits: it is measured alone (docs/ALGORITHM.md)")


def check_width_options(epochs: int, penalty: float) -> None:
    """Options of data-aware width (peerd/algorithm/width.py): scoring epochs and the penalty
    weight."""
    require(type(epochs) is int and epochs >= 1, "width_epochs", epochs, "an integer >= 1")
    require(penalty > 0 and math.isfinite(penalty), "width_penalty", penalty,
             "a positive number")


def check_depth(depths: tuple[int, ...] | None, early_exits: bool,
                blocks: int | None = None) -> None:
    """Depths are block counts >= 1 (at most the model's `blocks`), and need early exits: a
    peer's deepest kept block must have an exit to train."""
    if depths is None:
        return
    for depth in depths:
        allowed = ">= 1" if blocks is None else f"in 1..{blocks} (the model's blocks)"
        require(depth >= 1 and (blocks is None or depth <= blocks), "depth", depth, allowed)
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


def parse_mu(text: str) -> tuple[float, ...]:
    """'0.5' for every peer, or '0.125,0.25,0.5' assigned to peers by position, cycled."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"mu={text!r} is invalid: give a number or a comma list") from None
    for mu in values:
        require(0 < mu <= 1, "mu", mu, "in (0, 1]")
    return values




def parse_width(text: str) -> float | str:
    """A daemon's mu: a number in (0, 1], or auto."""
    if text.strip().lower() == AUTO:
        return AUTO
    values = parse_mu(text)
    if len(values) != 1:
        raise ConfigError(f"mu={text!r} is invalid: a daemon has one width ratio, or auto")
    return values[0]


def parse_widths(text: str) -> tuple[float, ...] | str:
    """`peerd cluster`'s mu: one width, one per daemon (cycled), or auto."""
    return AUTO if text.strip().lower() == AUTO else parse_mu(text)


def parse_overlap_text(text: str) -> str:
    parse_overlap(text)
    return text


WHOLE_GROUPS_FORM = "a comma list of the model's unit group names, e.g. embd or res0,res1"


def parse_whole_groups(text: str | None) -> tuple[str, ...]:
    """msfusion's groups kept whole, from 'embd' or 'res0,res1' (None: none); whether the model
    has them is checked against its groups when a planner meets the model."""
    if text is None:
        return ()
    names = tuple(part.strip() for part in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"whole_groups={text!r} is invalid: must be {WHOLE_GROUPS_FORM}, each "
                          "named once")
    return names


def parse_whole_groups_text(text: str) -> str:
    """The names sorted, so that members listing them in another order agree."""
    return ",".join(sorted(parse_whole_groups(text)))


# The planners' and tasks' names, as peerd.algorithm.plan.PLANNERS and peerd.tasks.TASKS hold them
# (tests/test_first_minutes.py checks): importing those loads torch, which parsing must not
# wait for.
METHODS = ("fd", "fedrolex", "full", "heterofl", "msfusion")
TASK_NAMES = ("digits", "fmnist", "kjv", "kjv-large", "tabular")


def parse_task(text: str) -> str:
    """A built-in task's name or a reference to a user's (loaded later, with torch)."""
    if text in TASK_NAMES or ":" in text:
        return text
    raise ConfigError(
        f"invalid choice: {text!r} (choose from {', '.join(TASK_NAMES)}, or FILE.py:FUNCTION "
        f"or package.module:FUNCTION returning a peerd.Task)")


def parse_partition_text(text: str) -> str:
    try:
        parse_partition(text)
    except ValueError as error:
        raise ConfigError(f"partition={text!r} is invalid: {error}") from None
    return text


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SHARD_NUMBERING = "I/N, shard I of N with I counting from 0 (three devices: 0/3, 1/3 and 2/3)"


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N': the I-th (from 0) of N deterministic shards of the task's bundled data."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ConfigError(f"shard={text!r} is invalid: must be {SHARD_NUMBERING}") from None
    require(0 <= index < count, "shard", text, SHARD_NUMBERING)
    return index, count


SAME = "; the same on every member"


@dataclass(frozen=True)
class PeerOptions:
    """How a peer learns: options of `peerd sim`, `peerd cluster` and `peerd start`."""

    topology: str = option("ring", "who exchanges slices with whom: ring, full, or a TOML path")
    task: str = option(
        "digits", "the task: digits (8x8 CNN), fmnist (28x28 CNN), kjv (text), kjv-large "
        "(104M-parameter text), tabular (a CSV table, MLP), or your own: FILE.py:FUNCTION or "
        "package.module:FUNCTION returning a peerd.Task (docs/MODELS.md)"
        + SAME, parse=parse_task, metavar="digits|fmnist|kjv|kjv-large|tabular|FILE.py:FUNCTION")
    method: str = option("msfusion", "planner: msfusion, or a baseline: fedrolex, heterofl, fd "
                         "or full" + SAME, agreed=True, choices=METHODS)
    seed: int = option(0, "seeds init, data split, plans and batches" + SAME, agreed=True)
    reduce_scatter: bool = option(
        False, "entries three or more members hold are averaged once, by reduce-scatter and "
        "all-gather over their holders (fully connected topology), instead of every holder "
        "sending every other its values" + SAME, agreed=True)
    overlap: str = option(
        STATIC_OVERLAP, "msfusion: how much neighbouring windows overlap, static or decay:H "
        "(the overlap halves every H rounds)" + SAME, agreed=True, planner="msfusion",
        parse=parse_overlap_text, metavar="static|decay:H")
    drift_period: int = option(
        DRIFT_PERIOD, "msfusion: rounds in which a group of rate 1 drifts once around its "
        "ring; a group of rate r drifts r times as fast (drift_rates)" + SAME, agreed=True,
        planner="msfusion", rule=at_least(1), metavar="R")
    drift_rates: str = option(
        DEFAULT_DRIFT_RATES, "msfusion: how many times each group drifts around in a drift "
        "period: rank (the r-th group r + 1) or colour (1 + the group's colour in a greedy "
        "colouring of the groups that share a weight)" + SAME, agreed=True, planner="msfusion",
        choices=DRIFT_RATES)
    layout: str = option(
        "ring", "msfusion: the order of the peers' windows: ring (each group's windows in ring "
        "order), or the experiments scattered and rotating (docs/ALGORITHM.md)" + SAME,
        agreed=True, planner="msfusion", choices=WINDOW_LAYOUTS)
    whole_groups: str | None = option(
        None, "msfusion: unit groups every member keeps whole in every round, not windowed (e.g. "
        "embd, a transformer's residual width; an unknown name is refused with the model's "
        "groups listed)" + SAME,
        agreed=True, planner="msfusion", parse=parse_whole_groups_text, metavar="NAME[,NAME...]")
    partition: str = option(
        "iid", "how the data is split among peers: iid, dirichlet:ALPHA, natural",
        parse=parse_partition_text, metavar="iid|dirichlet:ALPHA|natural")
    data_dir: str | None = option(
        None, "your own copy of the task's data (default: the bundled data): IDX files or an "
        "image folder (digits, fmnist), text files (kjv), a CSV file (tabular)")
    label_column: str = option(
        "label", "with data_dir FILE.csv (task tabular): the column that holds the class")
    wire_dtype: str = option(
        "float32", "precision of exchanged values: float32, float16 or bfloat16" + SAME,
        choices=WIRE_DTYPES)
    early_exits: bool = option(
        False, "an exit head after every block, CE on every exit and self-distillation" + SAME
        + "; needed by depth and freeze")
    distill_temperature: float = option(
        3.0, "with early_exits: temperature T of self-distillation, loss CE + T^2 KL",
        rule=positive(), metavar="T")
    distill: bool = option(
        True, "with early_exits: the deepest exit teaches the others (off: CE on every exit "
        "only)", "--no-distill", off_help="with --early-exits: no self-distillation, CE on "
        "every exit only (default: distillation on)")
    contrastive: bool = option(
        False, "MOON-style model-contrastive term in local training (5/3 of the training FLOPs)")
    contrastive_weight: float = option(1.0, "with contrastive: its weight lambda",
                                       rule=non_negative(), metavar="LAMBDA")
    contrastive_tau: float = option(0.5, "with contrastive: its temperature tau",
                                    rule=positive(), metavar="TAU")
    learned_width: bool = option(
        False, "with mu < 1: learn how many units of each group to keep on the local data "
        "(Co-S2P), within the FLOPs of the uniform mu sub-model; announced with the capacity")
    width_epochs: int = option(10, "with learned_width: epochs of unit scoring at start")
    width_penalty: float = option(0.1, "with learned_width: weight of the FLOPs budget penalty")

    def __post_init__(self) -> None:
        check_options(self)
        check_width_options(self.width_epochs, self.width_penalty)
        parse_overlap(self.overlap)
        parse_whole_groups(self.whole_groups)
        if self.whole_groups is not None and self.learned_width and self.method == "msfusion":
            # Learned widths spend a FLOPs budget over every group's width; a whole group is
            # not theirs to choose, and the budget does not count it.
            raise ConfigError(f"whole_groups={self.whole_groups!r} cannot be combined with "
                              "learned_width: choose one")
        self.train_config(TrainConfig())  # checks the contrastive options with early_exits

    def train_config(self, task_defaults: TrainConfig) -> TrainConfig:
        """The task's training defaults with these early-exit and contrastive options."""
        return replace(task_defaults, early_exits=self.early_exits,
                       distill_temperature=self.distill_temperature if self.distill else None,
                       contrastive=self.contrastive, contrastive_weight=self.contrastive_weight,
                       contrastive_tau=self.contrastive_tau)


def planner_options(config: PeerOptions) -> dict[str, object]:
    """The options declared for `config.method`'s planner: its class's keyword arguments."""
    return {f.name: getattr(config, f.name) for f in option_fields(config)
            if spec_of(f).planner == config.method}


@dataclass(frozen=True)
class DaemonOptions(PeerOptions):
    """Options of daemons that `peerd cluster` also takes and passes on to its daemons."""

    memory_budget: str | None = option(
        None, "with mu auto: memory the whole daemon may use, e.g. 800M or 1.5G (default: "
        "what it uses at start plus what the kernel reports available)", metavar="SIZE")
    sync: bool = option(
        False, "strict synchronous rounds: every round waits for every neighbour's slice (as "
        "`peerd sim` does); default: semi-asynchronous rounds that close at an adaptive "
        "deadline and merge late slices with a staleness weight")
    mdns: bool = option(
        True, "announce this daemon and find peers by mDNS (off: peers are found only by their "
        "--peer addresses)", "--no-mdns", off_help="do not announce this daemon or browse by "
        "mDNS: find peers only by their --peer addresses (default: mDNS on)")
    bulk: bool = option(
        True, "serve a bulk listener (same TLS identity as gRPC) and send large slices to "
        "neighbours' bulk listeners instead of over gRPC (docs/NETWORK.md, \"The bulk path\")",
        "--no-bulk", off_help="no bulk listener: every slice goes over gRPC (default: large "
        "slices go over the bulk path, docs/NETWORK.md)")
    bulk_threshold: int = option(
        DEFAULT_BULK_THRESHOLD, "slices of at least this many payload bytes go over the bulk "
        "path, smaller ones over gRPC", parse=partial(parse_size, name="bulk_threshold"),
        metavar="SIZE")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_budget is not None:
            parse_size(self.memory_budget, "memory_budget")

    def _auto_only(self, mu: object, names: tuple[str, ...]) -> None:
        for name in names:
            if mu != AUTO and getattr(self, name) is not None:
                raise ConfigError(f"{name}={getattr(self, name)!r} is only used with mu auto "
                                  f"(mu is {mu})")


@dataclass(frozen=True)
class DaemonConfig(DaemonOptions):
    """One daemon (`peerd start`): the shared options above, then a daemon's own."""

    mu: float | str = option(
        0.5, "width ratio of this peer's slice, in (0, 1]; auto: the widest of 0.5, 0.25, "
        "0.125, 0.0625 that fits memory_budget (and round_target) by a probe at start",
        parse=parse_width, metavar="F|auto")
    round_target_s: float | None = option(
        None, "with mu auto: seconds of local training a round should take at most (soft)",
        "--round-target", rule=positive())
    depth: int | None = option(
        None, "blocks this peer keeps, the shallowest (default: all; with mu auto and "
        "early_exits the probe chooses)")
    frozen_blocks: int = option(
        0, "shallowest kept blocks this peer does not train (saves gradients, optimizer state "
        "and activations; with mu auto and early_exits the probe chooses)", "--freeze",
        rule=at_least(0))
    host: str = option("0.0.0.0", "address gRPC listens on")
    port: int = option(7470, "gRPC port (0: any free port)",
                       rule=Rule(lambda port: 0 <= port <= 65535, "in 0..65535 (0: any free "
                                 "port)"))
    peers: tuple[str, ...] = option(
        (), "a peer's HOST:PORT, for networks without multicast (repeatable)", "--peer",
        metavar="HOST:PORT")
    mdns_interface: str | None = option(None, "IPv4 address of the interface mDNS uses")
    cluster: str = option("default", "cluster name: peers of other clusters are ignored",
                          rule=Rule(lambda name: 1 <= len(name) <= 64, "1 to 64 characters"))
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
        "devices take 0/3, 1/3 and 2/3)", parse=parse_shard, metavar="I/N")
    rounds: int | None = option(None, "stop after this round (default: run until stopped)",
                                rule=at_least(1))
    min_peers: int = option(2, "members needed before the first round", rule=at_least(1))
    threads: int | None = option(None, "torch threads (default: all cores)", rule=at_least(1))
    round_timeout_s: float = option(300.0, "seconds to wait for the neighbours' slices",
                                    "--round-timeout", rule=Rule(lambda s: s > 0, "> 0"))
    # Handshakes repeat every 0.5 s: a shorter silence is no evidence of anything.
    dead_after_s: float = option(
        10.0, "seconds a member may go unheard before the others drop it from the view",
        "--dead-after", rule=at_least(1))
    quorum: float = option(
        0.5, "semi-async: fraction of the neighbours whose slices must be in before the "
        "deadline may close a round, in [0, 1]", rule=Rule(lambda q: 0 <= q <= 1, "in [0, 1]"))
    deadline_mads: float = option(
        4.0, "semi-async: a round waits the median recent arrival delay plus this many median "
        "absolute deviations", "--deadline-mads", rule=non_negative())
    deadline_floor_s: float = option(
        0.25, "semi-async: the shortest deadline in seconds (the longest is --round-timeout)",
        "--deadline-floor")
    staleness_exponent: float = option(
        0.5, "semi-async: a slice s rounds late is merged with weight (1 + s)^-a, a being this",
        rule=non_negative())
    max_staleness: int = option(
        4, "semi-async: a slice more than this many rounds late is dropped, never merged",
        rule=Rule(lambda rounds: rounds >= 0, ">= 0 (0: late slices are never merged)"))
    slowdown: float = option(
        1.0, "for tests and benchmarks: local training takes this many times as long (the "
        "daemon sleeps after training); leave at 1",
        rule=Rule(lambda s: s >= 1 and math.isfinite(s), "a number >= 1"))
    checkpoints_kept: int = option(
        3, "checkpoints kept in state_dir/checkpoints, one per round (0: none written)",
        rule=at_least(0))
    metrics_port: int | None = option(
        None, "port of the HTTP endpoint: Prometheus /metrics, the live page / and its JSON API "
        "/api/ (docs/WEB.md; default: off)",
        rule=Rule(lambda port: 0 <= port <= 65535, "in 0..65535, or unset for no endpoint"))
    metrics_host: str | None = option(
        None, "address the metrics port listens on (default: host, the gRPC address)")
    bulk_port: int = option(
        0, "TCP port of the bulk listener (0: any free port; peers learn it from the handshake)",
        rule=Rule(lambda port: 0 <= port <= 65535, "in 0..65535"))
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR", choices=LOG_LEVELS)
    linger_s: float = option(0.0, "seconds to keep serving pulls after the last round",
                             "--linger", rule=at_least(0))

    def __post_init__(self) -> None:
        if self.mu != AUTO:
            require(isinstance(self.mu, int | float) and 0 < self.mu <= 1, "mu", self.mu,
                    "in (0, 1], or auto")
        super().__post_init__()
        self._auto_only(self.mu, ("memory_budget", "round_target_s"))
        self._check_depth()
        require(0 < self.deadline_floor_s <= self.round_timeout_s, "deadline_floor_s",
                self.deadline_floor_s, f"> 0 and at most round_timeout_s ({self.round_timeout_s})")
        if self.shard is not None:
            index, count = self.shard
            require(0 <= index < count, "shard", f"{index}/{count}", SHARD_NUMBERING)

    def _check_depth(self) -> None:
        check_depth(None if self.depth is None else (self.depth,), self.early_exits)
        if self.frozen_blocks and not self.early_exits:
            raise ConfigError(f"frozen_blocks={self.frozen_blocks} needs early_exits "
                              "(--early-exits)")
        if self.depth is not None:
            require(self.frozen_blocks < self.depth, "frozen_blocks", self.frozen_blocks,
                    f"less than depth ({self.depth}): at least one block must train")
        if self.mu == AUTO and self.early_exits:
            for name in ("depth", "frozen_blocks"):
                if getattr(self, name):
                    raise ConfigError(f"{name}={getattr(self, name)!r}: with mu auto and "
                                      "early_exits the probe chooses depth and frozen blocks")

    def peer_mu(self, position: int) -> float | str:
        return self.mu

    def peer_depth(self, position: int) -> int | None:
        return self.depth

    @property
    def shard_count(self) -> int | None:
        """Shards the training set is cut into (None: all of it is this peer's)."""
        return None if self.shard is None else self.shard[1]


def check_run_options(peers: int, rounds: int, eval_every: int, eval_samples: int | None
                      ) -> None:
    """The options of a `sim` or `cluster` run."""
    require(peers >= 1, "peers", peers, ">= 1")
    require(rounds >= 1, "rounds", rounds, ">= 1")
    require(eval_every >= 1, "eval_every", eval_every, ">= 1")
    require(eval_samples is None or eval_samples >= 1, "eval_samples", eval_samples, ">= 1")


@dataclass(frozen=True)
class SimConfig(PeerOptions):
    """`peerd sim`: N peers in one process."""

    peers: int = option(4, "number of peers")
    mu: tuple[float, ...] = option(
        (0.5,), "width ratio: one value, or one per peer (cycled)", parse=parse_mu,
        metavar="F[,F...]", per_peer=True)
    depth: tuple[int, ...] | None = option(
        None, "blocks each peer keeps (the shallowest): one value, or one per peer (cycled); "
        "default: all", parse=parse_depth, metavar="N[,N...]", per_peer=True)
    rounds: int = option(30, "rounds to run")
    out: str = option("runs/sim", "directory for metrics and plots")
    eval_every: int = option(1, "evaluate the assembled model every K rounds")
    eval_samples: int | None = option(
        None, "global test samples per evaluation (default: the task's)")
    storage_replicas: int = option(
        0, "sharded parameters: no peer keeps the full model, every entry is stored by R "
        "members (rendezvous placement, docs/ALGORITHM.md); 2 or more survives a member "
        "leaving; 0: off", rule=at_least(0), metavar="R")
    # The task's training hyper-parameters (peerd/tasks.py) when None; the options above set
    # its early-exit and contrastive fields.
    train: TrainConfig | None = None
    # Each peer's mean shard: the training set is first cut to a seeded peers x shard_size
    # samples (benchmarks of scale: the same data per peer whatever the peer count).
    shard_size: int | None = None
    # The simulator's rounds are synchronous: no slice is late and no block frozen.
    frozen_blocks = 0
    staleness_exponent = DaemonConfig.staleness_exponent
    max_staleness = DaemonConfig.max_staleness

    def __post_init__(self) -> None:
        check_run_options(self.peers, self.rounds, self.eval_every, self.eval_samples)
        super().__post_init__()
        require(self.shard_size is None or self.shard_size >= 2, "shard_size", self.shard_size,
                ">= 2 or unset")
        require(len(self.mu) >= 1, "mu", self.mu, "at least one value")
        for mu in self.mu:
            require(0 < mu <= 1, "mu", mu, "in (0, 1]")
        check_depth(self.depth, self.early_exits)
        if self.storage_replicas:
            require(self.storage_replicas <= self.peers, "storage_replicas",
                    self.storage_replicas, f"at most the {self.peers} peers")
            unsupported = {
                "contrastive": "a sharded peer does not keep its last round's sub-model yet",
                "reduce_scatter": "sharded rounds already average once, at the storers"}
            for name, reason in unsupported.items():
                if getattr(self, name):
                    raise ConfigError(f"{name} is not supported with storage_replicas: "
                                      f"{reason}")
        if self.train is not None:
            optioned = PeerOptions.train_config(self, self.train)
            for name in ("early_exits", "distill_temperature", "contrastive",
                         "contrastive_weight", "contrastive_tau"):
                if getattr(self.train, name) != getattr(optioned, name):
                    raise ConfigError(f"train.{name}={getattr(self.train, name)!r} differs from "
                                      "the options: pass them too, SimConfig(train=train, "
                                      "**train_options(train))")

    def train_config(self, task_defaults: TrainConfig) -> TrainConfig:
        return super().train_config(self.train if self.train is not None else task_defaults)

    def peer_mu(self, position: int) -> float:
        return self.mu[position % len(self.mu)]

    def peer_depth(self, position: int) -> int | None:
        return None if self.depth is None else self.depth[position % len(self.depth)]

    @property
    def shard_count(self) -> int:
        return self.peers


def train_options(train: TrainConfig) -> dict[str, object]:
    """The options that give `train`'s early-exit and contrastive fields: what
    `SimConfig(train=train)` needs besides."""
    return {"early_exits": train.early_exits, "distill": train.distill_temperature is not None,
            "distill_temperature": train.distill_temperature or TrainConfig.distill_temperature,
            "contrastive": train.contrastive, "contrastive_weight": train.contrastive_weight,
            "contrastive_tau": train.contrastive_tau}


@dataclass(frozen=True)
class ClusterConfig(DaemonOptions):
    """`peerd cluster`: N daemon processes on loopback. Every option it shares with
    `DaemonConfig` (the per-peer ones cycled) reaches the daemons' command lines."""

    peers: int = option(4, "number of daemon processes")
    mu: tuple[float, ...] | str = option(
        (0.5,), "width ratio: one value, one per daemon (cycled), or auto (each daemon "
        "measures what it affords)", parse=parse_widths, metavar="F[,F...]|auto",
        per_peer=True)
    depth: tuple[int, ...] | None = option(
        None, "blocks each daemon keeps (the shallowest): one value, or one per daemon "
        "(cycled); default: all", parse=parse_depth, metavar="N[,N...]", per_peer=True)
    rounds: int = option(30, "rounds to run")
    out: str = option("runs/cluster",
                      "directory for metrics, plots, the CA and each daemon's state")
    eval_every: int = option(1, "evaluate the assembled model every K rounds")
    eval_samples: int | None = option(
        None, "global test samples per evaluation (default: the task's)")
    memory_limit: int | None = option(
        None, "start each daemon in a cgroup v1 memory group of SIZE (e.g. 1536MiB): the kernel "
        "kills a daemon that needs more; OUT/memory.json reports each one's peak and OOM kills "
        "(root)", parse=partial(parse_size, name="memory_limit"), metavar="SIZE")
    static_peers: bool = True  # each daemon also gets the others' addresses (--peer)
    round_timeout_s: float = 120.0
    slowdown: tuple[float, ...] = ()  # benchmarks: training slowdown by position (missing: 1)

    def __post_init__(self) -> None:
        check_run_options(self.peers, self.rounds, self.eval_every, self.eval_samples)
        super().__post_init__()
        if self.mu != AUTO:
            for mu in self.mu:
                require(0 < mu <= 1, "mu", mu, "in (0, 1]")
        self._auto_only(self.mu, ("memory_budget",))
        check_depth(self.depth, self.early_exits)
        for position in range(self.peers):
            DaemonConfig(**member_options(self, position))  # what each daemon will check


# `peerd cluster`'s own options: the run's, not its daemons'.
CLUSTER_RUN_OPTIONS = ("peers", "out", "eval_every", "eval_samples", "memory_limit")


def member_options(config: ClusterConfig, position: int) -> dict[str, object]:
    """The options `peerd cluster` gives the daemon at `position`: every option it shares with
    the daemons, the per-peer ones cycled by position."""
    values = {}
    for option_field in option_fields(config):
        if option_field.name in CLUSTER_RUN_OPTIONS:
            continue
        value = getattr(config, option_field.name)
        if spec_of(option_field).per_peer and isinstance(value, tuple):
            value = value[position % len(value)]
        values[option_field.name] = value
    return values


# ---- layered daemon configuration: defaults < file < environment < flags --------------------

DEFAULT_CONFIG_FILE = Path("/etc/peerd/peerd.toml")
ENV_PREFIX = "PEERD_"


def read_config_file(path: Path, config_class: type = DaemonConfig) -> dict[str, object]:
    try:
        table = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return read_table(config_class, table, str(path))


def read_environment(environ: Mapping[str, str], config_class: type = DaemonConfig
                     ) -> dict[str, object]:
    """The options PEERD_* variables set; an unknown PEERD_* variable is an error."""
    return read_variables(config_class, environ, ENV_PREFIX)


def load_daemon_config(
    config_file: str | None, environ: Mapping[str, str], flags: Mapping[str, object],
    config_class: type = DaemonConfig,
) -> DaemonConfig:
    """Defaults < the config file (`--config`, else /etc/peerd/peerd.toml if present) <
    PEERD_* environment variables < flags given on the command line."""
    values: dict[str, object] = {}
    if config_file is not None:
        values.update(read_config_file(Path(config_file), config_class))
    elif DEFAULT_CONFIG_FILE.exists():
        values.update(read_config_file(DEFAULT_CONFIG_FILE, config_class))
    values.update(read_environment(environ, config_class))
    values.update(flags)
    return config_class(**values)


def config_lines(config: object) -> list[str]:
    """`peerd config`: every option as the config file would hold it (an unset one as a
    comment)."""
    lines = []
    for option_field in option_fields(config):
        name, value = option_field.name, getattr(config, option_field.name)
        if value is None:
            lines.append(f"# {name} is unset")
        elif required_type(field_type(type(config), name)) == tuple[int, int]:
            lines.append(f'{name} = "{value[0]}/{value[1]}"')
        else:
            shown = list(value) if isinstance(value, tuple) else value
            lines.append(f"{name} = {json.dumps(shown)}")
    return lines


COMMANDS_OF = (("start", DaemonConfig), ("cluster", ClusterConfig), ("sim", SimConfig))


def reference_table() -> str:
    """docs/CONFIG.md's table, generated from the declarations so that it cannot drift."""
    lines = [
        "| option (file key) | flag | environment | default | commands | agreed | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    seen: list[object] = []
    for _, config_class in COMMANDS_OF:
        for option_field in option_fields(config_class):
            if any(option_field is other for other in seen):
                continue  # inherited: one declaration, one row
            seen.append(option_field)
            commands = ", ".join(command for command, other in COMMANDS_OF
                                 if _declared(other, option_field))
            in_daemon = _declared(DaemonConfig, option_field)
            spec = spec_of(option_field)
            agreed = ("yes" if spec.planner is None else f"with {spec.planner}") \
                if spec.agreed else ""
            lines.append(
                f"| `{option_field.name}` | `{option_flag(option_field)}` | "
                + (f"`{ENV_PREFIX}{option_field.name.upper()}`" if in_daemon else "")
                + f" | {shown_default(option_default(option_field))} | {commands} | {agreed} | "
                f"{spec.help} ({describe(config_class, option_field)}) |")
    return "\n".join(lines) + "\n"


def _declared(config_class: type, option_field: object) -> bool:
    """Does `config_class` have this very declaration (its own or inherited)?"""
    return any(f is option_field for f in fields(config_class))
