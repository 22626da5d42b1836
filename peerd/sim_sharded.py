"""`peerd sim --storage-replicas R`: the sharded round (peerd/algorithm/sharded.py) for many
peers in one process.

No peer keeps the full model: each holds its store (its blocks of the placement), the running
sums of the round it merges, and its own sub-model while it trains. Every pull, push and
re-replication is counted in bytes, and each peer's held bytes are measured at every step of a
round and kept as its peak, to compare with its bound (`ShardedCluster.bound_bytes`).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from peerd.algorithm.coverage import CoverageTracker
from peerd.algorithm.engine import Engine, TrainStats
from peerd.algorithm.plan import Member, Plans
from peerd.algorithm.sharded import (
    Push,
    ShardRefused,
    Storer,
    Window,
    pulled_submodel,
    pushes_for,
    slice_shapes,
    trained_values,
)
from peerd.algorithm.shards import (
    BlockLayout,
    ShardStore,
    assemble_stores,
    place,
    replicate,
    seed_stores,
)
from peerd.algorithm.submodel import Params, forward_flops_per_sample, init_params
from peerd.config import SimConfig
from peerd.data import TaskData
from peerd.metrics import MetricsLog, PeerRound, evaluate_global, run_title
from peerd.models.base import ModelSpec, Plan, full_plan, full_units
from peerd.peer import build_peer, load_data
from peerd.tasks import get_task


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ShardedPeer:
    engine: Engine
    member: Member
    storer: Storer
    peak_bytes: int = 0

    @property
    def peer_id(self) -> str:
        return self.engine.peer_id

    def measure(self, *buffers: torch.Tensor) -> None:
        """Held now: the store, the round's sums, and `buffers` (its training's tensors)."""
        self.peak_bytes = max(self.peak_bytes, self.storer.held_bytes() + tensor_bytes(*buffers))


class ShardedCluster:
    def __init__(self, spec: ModelSpec, peers: list[tuple[Engine, Member]], replicas: int,
                 seed: int, initial: Params) -> None:
        self.spec = spec
        self.seed = seed
        self.replicas = replicas
        self.layout = BlockLayout.of(initial)
        self.placement = place(self.layout.blocks, [e.peer_id for e, _ in peers], replicas, seed)
        stores = {engine.peer_id: ShardStore(self.layout, engine.peer_id) for engine, _ in peers}
        seed_stores(self.layout, self.placement, initial, stores)
        self.peers = {engine.peer_id: ShardedPeer(engine, member,
                                                  Storer(spec, stores[engine.peer_id],
                                                         self.placement))
                      for engine, member in peers}
        for peer in self.peers.values():
            peer.engine.params = {}  # a sharded peer keeps no full copy
        self.bytes_sent: Counter[str] = Counter()
        self.pull_bytes = 0
        self.push_bytes = 0
        self.replicated_bytes = 0

    @property
    def members(self) -> list[Member]:
        return [self.peers[peer_id].member for peer_id in sorted(self.peers)]

    def stores(self) -> dict[str, ShardStore]:
        return {peer_id: peer.storer.store for peer_id, peer in self.peers.items()}

    def window_bytes(self, plan: Plan) -> int:
        """The bytes of the plan's sub-model: its slice of every parameter it holds."""
        shapes = slice_shapes(self.spec, self.layout, plan).values()
        return sum(shape.numel() for shape in shapes) * self.layout.entry_bytes

    def bound_bytes(self, plan: Plan) -> int:
        """What a peer training `plan` may hold: its store's bound, one bool per stored entry
        (which entries the round has summed), one block of weights while it closes, and
        twice its window (its sub-model, and its values again while they are pulled or
        pushed)."""
        layout, capacity = self.layout, self.placement.capacity
        return (self.placement.storer_bound_bytes(layout) + capacity * layout.block_entries
                + layout.block_bytes + 2 * self.window_bytes(plan))

    def _pull(self, trainer: str, round_index: int, block: int) -> torch.Tensor:
        """Block `block`'s window entries from its first storer that answers."""
        refusals = []
        for storer_id in self.placement.storers[block]:
            try:
                values = self.peers[storer_id].storer.serve_pull(trainer, round_index, block)
            except ShardRefused as refused:
                refusals.append(str(refused))
                continue
            size = tensor_bytes(values)
            self.bytes_sent[storer_id] += size
            self.pull_bytes += size
            return values
        raise LookupError(f"no storer of block {block} served {trainer}: {refusals}")

    def deliver(self, push: Push) -> None:
        """A push over the (in-memory) wire: a copy, counted, into the receiver's storer."""
        copied = Push(push.sender, push.receiver, push.round_index, push.weight,
                      push.values.clone())
        self.peers[push.receiver].storer.accept_push(copied)
        self.bytes_sent[push.sender] += push.payload_bytes()
        self.push_bytes += push.payload_bytes()

    def run_round(self, round_index: int) -> tuple[Plans, list[TrainStats]]:
        """Every peer's round: all pull and train, then all push, then every storer closes.
        Returns the plans and each peer's stats by id order."""
        members = self.members
        ordered = sorted(self.peers)
        contexts = {peer_id: self.peers[peer_id].engine.begin_round(round_index, members)
                    for peer_id in ordered}
        plans = contexts[ordered[0]].plans_now
        for peer in self.peers.values():
            peer.storer.begin_round(round_index, plans, self.placement)
        trained, stats = {}, []
        for peer_id in ordered:
            peer, plan = self.peers[peer_id], plans[peer_id]
            counts = Window(self.spec, self.layout, plan).counts()
            values = {block: self._pull(peer_id, round_index, block) for block in counts}
            peer.measure(*values.values())
            module, stat = peer.engine.train_submodel(
                contexts[peer_id], partial(pulled_submodel, self.spec, self.layout, plan, values))
            del values
            trained[peer_id] = (counts, trained_values(self.spec, self.layout, module))
            peer.measure(trained[peer_id][1], *module.parameters())
            stats.append(stat)
        for peer_id in ordered:
            peer = self.peers[peer_id]
            counts, values = trained.pop(peer_id)
            for push in pushes_for(peer_id, round_index, peer.engine.weight, self.placement,
                                   counts, values):
                self.deliver(push)
                peer.measure(values, push.values)
                self.peers[push.receiver].measure()
        for peer in self.peers.values():
            peer.measure(torch.empty(self.layout.block_entries, dtype=self.layout.dtype))
            peer.storer.close_round()
        return plans, stats

    def remove(self, *peer_ids: str) -> int:
        """`peer_ids` leave at once (their stores are gone with them): the placement moves
        their blocks, the survivors copy them from the remaining replicas. Returns the entries
        copied."""
        for peer_id in peer_ids:
            del self.peers[peer_id]
        after = place(self.layout.blocks, sorted(self.peers), self.replicas, self.seed)
        copied = replicate(self.placement, after, self.stores())
        self.replicated_bytes += copied * self.layout.entry_bytes
        self.placement = after
        for peer in self.peers.values():
            peer.storer.placement = after
            peer.measure()
        return copied

    def assemble(self) -> Params:
        return assemble_stores(self.layout, self.placement, self.stores())


def build_cluster(config: SimConfig, data: TaskData) -> ShardedCluster:
    peers = [build_peer(config, position, f"peer-{position:02d}", data)
             for position in range(config.peers)]
    spec = peers[0].spec
    return ShardedCluster(spec, [(p.engine, p.member) for p in peers], config.storage_replicas,
                          config.seed, init_params(spec, config.seed))


def run_sharded(config: SimConfig, on_round: Callable[[dict], None] | None = None,
                plot: bool = True) -> list[dict]:
    """`peerd sim` with sharded parameters: the same metrics lines as `sim.run`, plus each
    round's pull and push bytes and the peers' peak held bytes against their bound."""
    data = load_data(config)
    cluster = build_cluster(config, data)
    spec = cluster.spec
    task = get_task(config.task)
    eval_samples = config.eval_samples if config.eval_samples is not None else task.eval_samples
    identity = {"task": config.task, "method": config.method, "topology": "sharded",
                "peers": config.peers, "mu": statistics.fmean(m.mu for m in cluster.members),
                "seed": config.seed, "storage_replicas": config.storage_replicas}
    log = MetricsLog(Path(config.out), identity,
                     forward_flops_per_sample(spec, full_units(spec)))
    coverage = CoverageTracker(spec, init_params(spec, config.seed))
    train_flops_cum = [0] * config.peers
    started = time.monotonic()
    for round_index in range(config.rounds):
        plans, stats = cluster.run_round(round_index)
        coverage.record(plans.values())
        peers = []
        for position, (peer_id, stat) in enumerate(zip(sorted(cluster.peers), stats,
                                                       strict=True)):
            train_flops_cum[position] += stat.train_flops
            peers.append(PeerRound(stat.loss, stat.forward_flops_per_sample,
                                   train_flops_cum[position], cluster.bytes_sent[peer_id]))
        last = round_index + 1 == config.rounds
        evaluation, model = None, None
        if (round_index + 1) % config.eval_every == 0 or last:
            figures, model = evaluate_global(spec, data, {"cluster": cluster.assemble()},
                                             {"cluster": full_plan(spec)}, eval_samples)
            evaluation = {**figures, **shard_figures(cluster, plans)}
        record = log.record(round_index + 1, peers, coverage.fraction, evaluation,
                            time.monotonic() - started, model)
        if on_round is not None:
            on_round(record)
    log.close(run_title(config.method, config.mu, config.task, config.peers) if plot else None)
    return log.records


def shard_figures(cluster: ShardedCluster, plans: Plans) -> dict[str, float]:
    peak = max(peer.peak_bytes for peer in cluster.peers.values())
    bound = max(cluster.bound_bytes(plans[peer_id]) for peer_id in cluster.peers)
    return {"pull_bytes_cum": cluster.pull_bytes, "push_bytes_cum": cluster.push_bytes,
            "held_bytes_peak_max": peak, "held_bytes_bound_max": bound,
            "params_bytes": cluster.layout.params_bytes}
