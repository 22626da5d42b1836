"""Many peers in one process over an in-memory transport: the algorithm without a network.

Each round: every peer's round driver (the daemon's too) plans and trains, sends its neighbours
their slices, merges what it received; then the full model is assembled from the peers (mean
over this round's holders) and evaluated on the held-out test set. One JSON line of metrics per
round goes to OUT/metrics.jsonl and the learning curve to OUT/curves.png.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from peerd.algorithm.coverage import CoverageTracker
from peerd.algorithm.driver import RoundDriver, RoundOutcome, StaticRoster
from peerd.algorithm.engine import Engine, RoundContext, TrainStats
from peerd.algorithm.plan import Member
from peerd.algorithm.submodel import forward_flops_per_sample, init_params
from peerd.algorithm.transport import InMemoryTransport
from peerd.config import SimConfig
from peerd.data import TaskData
from peerd.metrics import MetricsLog, PeerRound, evaluate_global, local_figures, run_title
from peerd.models.base import ModelSpec, full_units
from peerd.ops.progress import Console, step_display
from peerd.peer import build_peer, load_data
from peerd.tasks import get_task


def peer_name(position: int) -> str:
    return f"peer-{position:02d}"


@dataclass
class Simulation:
    config: SimConfig
    data: TaskData
    spec: ModelSpec
    drivers: list[RoundDriver]
    members: list[Member]
    transport: InMemoryTransport
    coverage: CoverageTracker
    eval_samples: int | None
    # One loop for every round: the drivers' events belong to the loop they first waited on.
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    @property
    def engines(self) -> list[Engine]:
        return [driver.engine for driver in self.drivers]


def build(config: SimConfig, console: Console | None = None) -> Simulation:
    if console is not None:
        console.status(f"loading the {config.task} data")
    data = load_data(config)
    peers = [build_peer(config, position, peer_name(position), data)
             for position in range(config.peers)]
    members = [peer.member for peer in peers]
    roster = StaticRoster(tuple(members))
    transport = InMemoryTransport()
    parts = transport if config.reduce_scatter else None
    drivers = [RoundDriver(peer.engine, roster, transport, reduce_parts=parts) for peer in peers]
    for driver in drivers:
        transport.connect(driver.peer_id, driver.accept)
        if driver.parts is not None:
            transport.connect_parts(driver.peer_id, driver.parts.accept_part)
    spec = peers[0].spec
    task = get_task(config.task)
    eval_samples = config.eval_samples if config.eval_samples is not None else task.eval_samples
    return Simulation(config, data, spec, drivers, members, transport,
                      CoverageTracker(spec, init_params(spec, config.seed)), eval_samples)


def run_round(sim: Simulation, round_index: int) -> tuple[list[RoundContext], list[TrainStats]]:
    """Every peer's round `round_index`, each through the round driver, over the in-memory
    transport."""

    async def every_peer() -> list[RoundOutcome | None]:
        for driver in sim.drivers:
            driver.round_index = round_index
        return await asyncio.gather(*(driver.run_round() for driver in sim.drivers))

    outcomes = [outcome for outcome in sim.loop.run_until_complete(every_peer())
                if outcome is not None]
    assert len(outcomes) == len(sim.drivers), "a simulated round is never abandoned"
    contexts = [outcome.ctx for outcome in outcomes]
    sim.coverage.record(contexts[0].plans_now.values())
    return contexts, [outcome.stats for outcome in outcomes]


def evaluate_round(
    sim: Simulation, contexts: list[RoundContext],
) -> tuple[dict[str, float | list[float]], nn.Module]:
    """The round's figures and the assembled model they score."""
    peer_params = {engine.peer_id: engine.params for engine in sim.engines}
    figures, model = evaluate_global(sim.spec, sim.data, peer_params, contexts[0].plans_now,
                                     sim.eval_samples)
    local = [e.evaluate_local(ctx) for e, ctx in zip(sim.engines, contexts, strict=True)]
    # Each peer's own accuracy by position, so that mixed-width runs can be split by width.
    peer_acc = [e.accuracy for e in local]
    return {**figures, **local_figures(sim.spec, local), "peer_acc": peer_acc}, model


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
    if config.storage_replicas:
        from peerd.sim_sharded import run_sharded

        return run_sharded(config, on_round, plot)
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
        evaluation, model = None, None
        if (round_index + 1) % config.eval_every == 0 or last:
            if console is not None:
                console.status(f"round {round_index + 1}/{config.rounds}: evaluating")
            evaluation, model = evaluate_round(sim, contexts)
        record = log.record(round_index + 1, peers, sim.coverage.fraction, evaluation,
                            time.monotonic() - started, model)
        if on_round is not None:
            on_round(record)
    sim.loop.close()
    log.close(run_title(config.method, config.mu, config.task, config.peers) if plot else None)
    return log.records
