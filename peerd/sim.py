"""Many engines in one process over an in-memory transport: the algorithm without a network.

Each round: every engine plans and trains, sends its neighbours their slices, merges what it
received; then the full model is assembled from the peers (mean over this round's holders) and
evaluated on the held-out test set. One JSON line of metrics per round goes to
OUT/metrics.jsonl and the learning curve to OUT/curves.png.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peerd.config import ConfigError, SimConfig, check_depth
from peerd.coverage import CoverageTracker
from peerd.data import Split, TaskData, load_task_data, local_train_test, partition
from peerd.engine import Engine, RoundContext, TrainStats
from peerd.metrics import MetricsLog, PeerRound, evaluate_global, local_figures, run_title
from peerd.models.base import DEPTH, ModelSpec, full_units
from peerd.plan import Member, make_planner
from peerd.progress import Console, step_display
from peerd.submodel import forward_flops_per_sample, init_params
from peerd.tasks import BLOCK_SIZE, get_task
from peerd.topology import load_topology
from peerd.transport import InMemoryTransport
from peerd.width import WidthConfig, learn_widths


def peer_name(position: int) -> str:
    return f"peer-{position:02d}"


@dataclass
class Simulation:
    config: SimConfig
    data: TaskData
    spec: ModelSpec
    engines: list[Engine]
    members: list[Member]
    transport: InMemoryTransport
    coverage: CoverageTracker
    eval_samples: int | None


def build(config: SimConfig, console: Console | None = None) -> Simulation:
    task = get_task(config.task)
    if console is not None:
        console.status(f"loading the {config.task} data")
    data = load_task_data(config.task, config.data_dir, block_size=BLOCK_SIZE)
    train = config.train if config.train is not None else task.train
    spec = task.model(data, train.early_exits)
    if DEPTH in spec.groups:
        check_depth(config.depth, train.early_exits, spec.groups[DEPTH].units)
    planner = make_planner(config.method, config.seed, config.overlap, config.drift_period)
    topology = load_topology(config.topology)
    initial = init_params(spec, config.seed)
    train_set = _training_set(data, config)
    shards = partition(train_set, config.peers, config.partition, config.seed)
    members, engines = [], []
    for position, shard in enumerate(shards):
        peer_id = peer_name(position)
        local_train, local_test = local_train_test(shard, config.seed + position)
        mu, depth = config.peer_mu(position), config.peer_depth(position)
        widths = None
        if config.learned_width and mu < 1:
            if console is not None:
                console.status(f"{peer_id}: learning its widths on its data")
            widths = learn_widths(spec, initial, train_set.subset(local_train), train, mu, depth,
                                  WidthConfig(config.width_epochs, config.width_penalty),
                                  config.seed + position)
        members.append(Member(peer_id, mu, depth, widths))
        engines.append(Engine(
            peer_id, spec, {name: t.clone() for name, t in initial.items()},
            train_set.subset(local_train), train_set.subset(local_test), planner, topology,
            train, config.seed, config.wire_dtype,
        ))
    eval_samples = config.eval_samples if config.eval_samples is not None else task.eval_samples
    return Simulation(config, data, spec, engines, members, InMemoryTransport(),
                      CoverageTracker(spec, initial), eval_samples)


def _training_set(data: TaskData, config: SimConfig) -> Split:
    """All the task's training data, or a seeded peers x shard_size of it."""
    if config.shard_size is None:
        return data.train
    wanted = config.peers * config.shard_size
    if wanted > len(data.train):
        raise ConfigError(
            f"shard_size={config.shard_size} is invalid: {config.peers} peers x "
            f"{config.shard_size} exceeds the {len(data.train)} training samples of "
            f"{config.task}")
    order = np.random.default_rng(config.seed).permutation(len(data.train))
    return data.train.subset(np.sort(order[:wanted]))


def run_round(sim: Simulation, round_index: int) -> tuple[list[RoundContext], list[TrainStats]]:
    contexts = [engine.begin_round(round_index, sim.members) for engine in sim.engines]
    stats = [engine.train(ctx) for engine, ctx in zip(sim.engines, contexts, strict=True)]
    sim.coverage.record(contexts[0].plans_now.values())
    for engine, ctx in zip(sim.engines, contexts, strict=True):
        for message in engine.outbox(ctx):
            sim.transport.send(message)
    for engine, ctx in zip(sim.engines, contexts, strict=True):
        engine.merge(ctx, sim.transport.receive(engine.peer_id, round_index))
    return contexts, stats


def evaluate_round(
    sim: Simulation, contexts: list[RoundContext],
) -> dict[str, float | list[float]]:
    peer_params = {engine.peer_id: engine.params for engine in sim.engines}
    figures = evaluate_global(sim.spec, sim.data, peer_params, contexts[0].plans_now,
                              sim.eval_samples)
    local = [e.evaluate_local(ctx) for e, ctx in zip(sim.engines, contexts, strict=True)]
    # Each peer's own accuracy by position, so that mixed-width runs can be split by width.
    peer_acc = [e.accuracy for e in local]
    return {**figures, **local_figures(sim.spec, local), "peer_acc": peer_acc}


def _show_steps(sim: Simulation, console: Console, current_round: Callable[[], int]) -> None:
    """Each engine's training steps as a bar named by round and peer."""
    for position, engine in enumerate(sim.engines):
        def phase(engine: Engine = engine, position: int = position) -> str:
            return (f"round {current_round()}/{sim.config.rounds}: training "
                    f"{engine.peer_id} ({position + 1} of {len(sim.engines)})")

        engine.on_step = step_display(console, phase)


def run(config: SimConfig, on_round: Callable[[dict], None] | None = None,
        plot: bool = True, console: Console | None = None) -> list[dict]:
    """Runs every round; `plot` False leaves out OUT/curves.png (benchmarks plot their own);
    `console` shows each phase and each peer's training steps."""
    sim = build(config, console)
    rounds_started = [0]
    if console is not None:
        _show_steps(sim, console, lambda: rounds_started[0])
    identity = {
        "task": config.task, "method": config.method, "topology": config.topology,
        "peers": config.peers, "mu": statistics.fmean(m.mu for m in sim.members),
        "seed": config.seed,
    }
    log = MetricsLog(Path(config.out), identity,
                     forward_flops_per_sample(sim.spec, full_units(sim.spec)))
    if config.learned_width:
        # Which widths each peer learned: the run's capacity, not a per-round figure.
        (Path(config.out) / "widths.json").write_text(json.dumps(
            {m.peer_id: None if m.widths is None else dict(m.widths) for m in sim.members}))
    train_flops_cum = [0] * len(sim.engines)
    started = time.monotonic()
    for round_index in range(config.rounds):
        rounds_started[0] = round_index + 1
        contexts, stats = run_round(sim, round_index)
        peers = []
        for position, (engine, stat) in enumerate(zip(sim.engines, stats, strict=True)):
            train_flops_cum[position] += stat.train_flops
            peers.append(PeerRound(stat.loss, stat.forward_flops_per_sample,
                                   train_flops_cum[position],
                                   sim.transport.bytes_sent[engine.peer_id]))
        last = round_index + 1 == config.rounds
        evaluation = None
        if (round_index + 1) % config.eval_every == 0 or last:
            if console is not None:
                console.status(f"round {round_index + 1}/{config.rounds}: evaluating")
            evaluation = evaluate_round(sim, contexts)
        record = log.record(round_index + 1, peers, sim.coverage.fraction, evaluation,
                            time.monotonic() - started)
        if on_round is not None:
            on_round(record)
    log.close(run_title(config.method, config.mu, config.task, config.peers) if plot else None)
    return log.records
