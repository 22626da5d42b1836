"""One peer's set-up, the same in `peerd sim` and `peerd start`: its data, model, capacity and
engine, from the configuration and the peer's position.

The simulator builds every position of one process; a daemon builds the position of its shard.
Both take the same steps with the same seeds (the split of position I is seeded with seed + I,
learned widths too), which is what lets a synchronous run of daemons equal the simulator bit
for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from peerd.algorithm.driver import snapshot_bytes_held
from peerd.algorithm.engine import Engine, Staleness
from peerd.algorithm.plan import Member, planner_for
from peerd.algorithm.submodel import init_params, param_bytes
from peerd.algorithm.topology import load_topology
from peerd.algorithm.width import WidthConfig, learn_widths
from peerd.capacity import measure_capacity
from peerd.config import (
    AUTO,
    ConfigError,
    DaemonConfig,
    SimConfig,
    TrainConfig,
    check_depth,
    parse_size,
)
from peerd.data import Split, TaskData, local_train_test, partition
from peerd.models.base import DEPTH, ModelSpec, full_shapes_module
from peerd.tasks import get_task

log = logging.getLogger("peerd.peer")

# Besides its one full copy of the parameters a daemon holds its own slice after each of the
# last SNAPSHOTS_KEPT rounds (served to pulls), no more of them than fit in
# SNAPSHOT_BUDGET_FRACTION of the parameters' bytes or the floor below, whichever is more (the
# last two always), and outgoing and
# incoming slices: in a ring two of each in a round, none larger than its own slice this
# round and next (what `mu auto` leaves room for; more neighbours or late slices add a slice
# each, see docs/ALGORITHM.md).
SNAPSHOTS_KEPT = 16
SNAPSHOT_BUDGET_FRACTION = 0.25
# Small models keep all 16 (a semi-asynchronous cluster's watcher pulls rounds well behind the
# fastest daemon): the budget is never below this.
SNAPSHOT_BUDGET_FLOOR_BYTES = 64 << 20
TRAFFIC_SLICES = 2 + 2 * 2


def snapshot_budget_bytes(params_bytes: int) -> float:
    """What a daemon's round snapshots may hold, for parameters of `params_bytes`."""
    return max(SNAPSHOT_BUDGET_FRACTION * params_bytes, SNAPSHOT_BUDGET_FLOOR_BYTES)


@dataclass(frozen=True)
class Peer:
    """What a peer trains with: its engine (parameters, data, planner, topology) and its
    capacity as the other members see it."""

    engine: Engine
    member: Member

    @property
    def spec(self) -> ModelSpec:
        return self.engine.spec


# Either command's configuration: both answer what set-up asks (peer_mu, peer_depth,
# shard_count, train_config, frozen_blocks, staleness_*).
PeerConfig = SimConfig | DaemonConfig


def training_set(data: TaskData, config: PeerConfig) -> Split:
    """All the task's training data, or (sim with shard_size) a seeded peers x shard_size of it."""
    shard_size = config.shard_size if isinstance(config, SimConfig) else None
    if shard_size is None:
        return data.train
    wanted = config.peers * shard_size
    if wanted > len(data.train):
        raise ConfigError(
            f"shard_size={shard_size} is invalid: {config.peers} peers x {shard_size} exceeds "
            f"the {len(data.train)} training samples of {config.task}")
    order = np.random.default_rng(config.seed).permutation(len(data.train))
    return data.train.subset(np.sort(order[:wanted]))


def load_data(config: PeerConfig) -> TaskData:
    return get_task(config.task).load_data(config.data_dir, label_column=config.label_column)


def _has_representation(spec: ModelSpec) -> bool:
    """Whether the model splits its forward into features() and logits() (the contrastive
    term reads the representation between them)."""
    model_type = type(full_shapes_module(spec))
    return callable(getattr(model_type, "features", None)) and callable(
        getattr(model_type, "logits", None))


def build_peer(config: PeerConfig, position: int, peer_id: str,
               data: TaskData | None = None) -> Peer:
    """The peer at `position` (its shard of the data and its seeds) named `peer_id`; `data`
    saves loading the task again when one process builds many peers."""
    task = get_task(config.task)
    data = data if data is not None else load_data(config)
    train = config.train_config(task.train)
    mu, depth = config.peer_mu(position), config.peer_depth(position)
    spec = task.model(data, train.early_exits)
    blocks = spec.groups[DEPTH].units if DEPTH in spec.groups else None
    check_depth(None if depth is None else (depth,), train.early_exits, blocks)
    train_set = training_set(data, config)
    if config.shard_count is None:
        local_train, local_test = local_train_test(np.arange(len(train_set)), config.seed)
    else:
        shard = partition(train_set, config.shard_count, config.partition, config.seed)[position]
        # The split of position I is seeded with seed + I, in the simulator and in a daemon.
        local_train, local_test = local_train_test(shard, config.seed + position)
    train_split = train_set.subset(local_train)
    if task.local_eval_samples is not None:
        local_test = local_test[:task.local_eval_samples]
    engine = Engine(
        peer_id, spec, init_params(spec, config.seed), train_split, train_set.subset(local_test),
        planner_for(config, spec), load_topology(config.topology), train, config.seed,
        config.wire_dtype, Staleness(config.staleness_exponent, config.max_staleness),
        config.frozen_blocks,
    )
    if train.contrastive and not _has_representation(spec):
        raise ConfigError(f"task {config.task}: --contrastive needs a model with features() "
                          f"and logits() methods, as the built-in models have")
    if task.loss is not None:
        if train.contrastive or train.balanced_softmax:
            raise ConfigError(f"task {config.task}: its own loss cannot be combined with "
                              f"--contrastive or --balanced-softmax")
        engine.task_objective = task.loss
    if mu == AUTO:
        assert isinstance(config, DaemonConfig)
        mu, depth, engine.frozen_blocks = _measured_capacity(config, engine, train)
    widths = None
    if config.learned_width and mu < 1:
        log.info("%s: learning its widths on its data (%d epochs)", peer_id, config.width_epochs)
        widths = learn_widths(spec, engine.params, train_split, train, mu, depth,
                              WidthConfig(config.width_epochs, config.width_penalty),
                              config.seed + position)
        log.info("learned widths: %s", ", ".join(f"{name} {units}" for name, units in widths))
    return Peer(engine, Member(peer_id, float(mu), depth, widths))


def _measured_capacity(config: DaemonConfig, engine: Engine, train: TrainConfig
                       ) -> tuple[float, int | None, int]:
    """With mu auto: (mu, depth, frozen blocks) this device affords, measured by a probe (depth
    and frozen blocks only for a model with early exits)."""
    budget = None if config.memory_budget is None else parse_size(config.memory_budget)
    log.info("mu auto: measuring what this device affords (a probe of every candidate width)")
    full_bytes = param_bytes(engine.params)

    def held_bytes(slice_bytes: int) -> int:
        return int(TRAFFIC_SLICES * slice_bytes + snapshot_bytes_held(
            slice_bytes, SNAPSHOTS_KEPT, snapshot_budget_bytes(full_bytes)))

    choice = measure_capacity(engine.spec, engine.params, engine.train_split, train, budget,
                              config.round_target_s, held_bytes=held_bytes,
                              planner=engine.planner)
    log.info("mu auto: %s", choice.describe())
    return choice.mu, choice.depth, choice.frozen
