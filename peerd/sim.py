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

from peerd.aggregate import assemble
from peerd.config import SimConfig
from peerd.coverage import CoverageTracker
from peerd.data import TaskData, load_task_data, local_train_test, partition
from peerd.engine import Engine, RoundContext, TrainStats
from peerd.evaluate import evaluate
from peerd.models.base import ModelSpec, full_plan, full_units
from peerd.plan import Member, make_planner
from peerd.plots import plot_curves
from peerd.submodel import extract, forward_flops_per_sample, init_params
from peerd.tasks import BLOCK_SIZE, get_task
from peerd.topology import load_topology
from peerd.transport import InMemoryTransport


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


def build(config: SimConfig) -> Simulation:
    task = get_task(config.task)
    data = load_task_data(config.task, config.data_dir, block_size=BLOCK_SIZE)
    spec = task.model(data)
    train = config.train if config.train != SimConfig().train else task.train
    planner = make_planner(config.method, config.seed)
    topology = load_topology(config.topology)
    initial = init_params(spec, config.seed)
    shards = partition(data.train, config.peers, config.partition, config.seed)
    members, engines = [], []
    for position, shard in enumerate(shards):
        peer_id = peer_name(position)
        local_train, local_test = local_train_test(shard, config.seed + position)
        members.append(Member(peer_id, config.peer_mu(position)))
        engines.append(Engine(
            peer_id, spec, {name: t.clone() for name, t in initial.items()},
            data.train.subset(local_train), data.train.subset(local_test), planner, topology,
            train, config.seed,
        ))
    eval_samples = config.eval_samples if config.eval_samples is not None else task.eval_samples
    return Simulation(config, data, spec, engines, members, InMemoryTransport(),
                      CoverageTracker(spec, initial), eval_samples)


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


def evaluate_round(sim: Simulation, contexts: list[RoundContext]) -> dict[str, float]:
    plans = contexts[0].plans_now
    assembled = assemble(sim.spec, {e.peer_id: e.params for e in sim.engines}, plans)
    test = sim.data.test
    if sim.eval_samples is not None and sim.eval_samples < len(test):
        test = test.subset(np.arange(sim.eval_samples))
    global_eval = evaluate(extract(sim.spec, assembled, full_plan(sim.spec)), sim.spec.kind, test)
    local = [e.evaluate_local(ctx) for e, ctx in zip(sim.engines, contexts, strict=True)]
    result = {
        "global_acc": global_eval.accuracy,
        "global_loss": global_eval.loss,
        "peer_acc_mean": statistics.fmean(e.accuracy for e in local if e.samples),
    }
    if sim.spec.kind == "text":
        result["global_ppl"] = global_eval.perplexity
        result["peer_ppl_mean"] = statistics.fmean(e.perplexity for e in local if e.samples)
    return result


def run(config: SimConfig, on_round: Callable[[dict], None] | None = None) -> list[dict]:
    sim = build(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    flops_full = forward_flops_per_sample(sim.spec, full_units(sim.spec))
    records: list[dict] = []
    train_flops_cum = [0] * len(sim.engines)
    started = time.monotonic()
    sent_before = {e.peer_id: 0 for e in sim.engines}
    with open(out / "metrics.jsonl", "w") as metrics_file:
        for round_index in range(config.rounds):
            contexts, stats = run_round(sim, round_index)
            for position, stat in enumerate(stats):
                train_flops_cum[position] += stat.train_flops
            sent = {e.peer_id: sim.transport.bytes_sent[e.peer_id] for e in sim.engines}
            record = {
                "round": round_index + 1,
                "task": config.task,
                "method": config.method,
                "topology": config.topology,
                "peers": config.peers,
                "mu": statistics.fmean(m.mu for m in sim.members),
                "seed": config.seed,
                "train_loss_mean": statistics.fmean(s.loss for s in stats),
                "flops_per_sample_peer_mean": statistics.fmean(
                    s.forward_flops_per_sample for s in stats),
                "flops_per_sample_full": flops_full,
                "train_flops_cum_peer_mean": statistics.fmean(train_flops_cum),
                "bytes_sent_peer_mean": statistics.fmean(
                    sent[p] - sent_before[p] for p in sent),
                "bytes_sent_cum_peer_mean": statistics.fmean(sent.values()),
                "coverage": sim.coverage.fraction,
                "global_acc": None,
                "peer_acc_mean": None,
            }
            sent_before = sent
            last = round_index + 1 == config.rounds
            if (round_index + 1) % config.eval_every == 0 or last:
                record.update(evaluate_round(sim, contexts))
            record["wall_s"] = time.monotonic() - started
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            records.append(record)
            if on_round is not None:
                on_round(record)
    plot_curves(records, out / "curves.png",
                f"{config.method} mu={','.join(map(str, config.mu))} {config.task}, "
                f"{config.peers} peers")
    return records
