"""Reduce-scatter over holders (peerd/algorithm/reduce.py): the same mean as the direct
exchange, about 2 (h - 1) / h of the slice on the wire, and semi-async rounds with a late
owner."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
from pathlib import Path

import pytest
import torch
from daemons import ClusterCa, kill_all, start_loopback_daemons, wait_all
from safetensors.torch import load_file

from peerd.algorithm.driver import RoundDriver, RoundRules
from peerd.algorithm.reduce import MIN_HOLDERS, PartMessage, PartRefused, plan_parts, values_for
from peerd.algorithm.transport import SliceMessage
from peerd.config import SimConfig, TrainConfig
from peerd.sim import build, run_round

CONFIG = SimConfig(peers=4, rounds=2, topology="full", mu=(0.5,), out="unused",
                   train=TrainConfig(max_local_steps=1))


def _params_after(config: SimConfig, rounds: int) -> tuple[list[dict], object]:
    sim = build(config)
    for round_index in range(rounds):
        run_round(sim, round_index)
    return [{n: t.clone() for n, t in e.params.items()} for e in sim.engines], sim


def _expected_from_direct(direct: list[dict], sim, round_index: int) -> list[dict]:
    """What reduce-scatter must give each peer: for an entry some part holds, the direct
    exchange's value on the holder first in id order; for any other, the peer's own direct
    value."""
    engines = sim.engines
    ids = [e.peer_id for e in engines]
    ctx = sim.drivers[0].context(round_index)
    plan = plan_parts(engines[0].spec, engines[0].params, ctx, fully_connected=True)
    expected = [{n: t.clone() for n, t in params.items()} for params in direct]
    for part in plan.parts:
        first = direct[ids.index(part.holders[0])][part.name].reshape(-1)[part.entries]
        for peer_position, peer in enumerate(ids):
            selected = part.targets.get(peer)
            if peer == part.owner or (peer in part.targets and selected is None):
                expected[peer_position][part.name].reshape(-1)[part.entries] = first
            elif selected is not None:
                expected[peer_position][part.name].reshape(-1)[part.entries[selected]] = \
                    first[selected]
    return expected, plan


def test_sync_reduce_scatter_equals_the_direct_mean_bit_for_bit() -> None:
    for mu in ((1.0,), (0.5, 0.3, 0.5, 0.4)):  # every member holds all; mixed widths
        config = dataclasses.replace(CONFIG, mu=mu)
        direct, sim = _params_after(config, 1)
        reduced, _ = _params_after(dataclasses.replace(config, reduce_scatter=True), 1)
        expected, plan = _expected_from_direct(direct, sim, 0)
        assert plan.parts, f"mu {mu}: no entry held by {MIN_HOLDERS}+ peers"
        for position, params in enumerate(reduced):
            for name, tensor in params.items():
                assert torch.equal(tensor, expected[position][name]), (mu, position, name)


@pytest.mark.slow
def test_two_rounds_agree_with_the_direct_exchange_closely() -> None:
    # After the first merge the starts differ in the last bits (the direct exchange's other
    # holders sum their own value first), so later rounds agree to float32 rounding only.
    direct, _ = _params_after(CONFIG, 2)
    reduced, _ = _params_after(dataclasses.replace(CONFIG, reduce_scatter=True), 2)
    for ours, theirs in zip(reduced, direct, strict=True):
        for name in ours:
            assert torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6), name


def test_bytes_per_holder_are_two_h_minus_one_over_h_of_the_slice() -> None:
    config = dataclasses.replace(CONFIG, mu=(1.0,), reduce_scatter=True)
    _, sim = _params_after(config, 1)
    model_bytes = sum(t.numel() * t.element_size() for t in sim.engines[0].params.values())
    holders = config.peers
    floor = 2 * (holders - 1) / holders * model_bytes
    direct_bytes = (holders - 1) * model_bytes
    for engine in sim.engines:
        sent = sim.transport.bytes_sent[engine.peer_id]
        received = sim.transport.bytes_received[engine.peer_id]
        assert floor * 0.95 <= sent <= floor * 1.05, (sent, floor)
        assert floor * 0.95 <= received <= floor * 1.05, (received, floor)
        assert sent < direct_bytes * 0.7


def test_semi_async_a_late_owner_leaves_its_parts_at_each_holders_value() -> None:
    config = dataclasses.replace(CONFIG, mu=(1.0,), reduce_scatter=True)
    sim = build(config)
    rules = RoundRules(sync=False, quorum=0.5, round_timeout_s=2.0, deadline_floor_s=0.2)
    for driver in sim.drivers:
        driver.rules = rules
        driver.parts.rules = rules
    late_driver: RoundDriver = sim.drivers[-1]
    trained: dict[str, dict] = {}
    for driver in sim.drivers:
        engine = driver.engine
        train = engine.train

        def recording(ctx, engine=engine, train=train):
            stats = train(ctx)
            trained[engine.peer_id] = {n: t.clone() for n, t in engine.params.items()}
            return stats

        engine.train = recording

    async def round_zero() -> list:
        # The owner starts its round only after everyone else has merged.
        fast = await asyncio.gather(*(d.run_round() for d in sim.drivers[:-1]))
        outcomes = [*fast, await late_driver.run_round()]
        for driver in sim.drivers:
            await driver.finish_sends()  # semi-async sends run in the background
        return outcomes

    outcomes = sim.loop.run_until_complete(round_zero())
    assert all(outcome is not None for outcome in outcomes)
    ctx = sim.drivers[0].context(0)
    plan = plan_parts(sim.engines[0].spec, sim.engines[0].params, ctx, fully_connected=True)
    late_parts = plan.owned_by(late_driver.peer_id)
    assert late_parts
    for driver in sim.drivers[:-1]:
        own = trained[driver.peer_id]
        for part in late_parts:
            now = driver.engine.params[part.name].reshape(-1)[part.entries]
            assert torch.equal(now, own[part.name].reshape(-1)[part.entries])
        for part in plan.owned_by(driver.peer_id):  # averaged without the late holder
            now = driver.engine.params[part.name].reshape(-1)[part.entries]
            fast = sim.drivers[:-1]
            weighted = sum(trained[d.peer_id][part.name].reshape(-1)[part.entries]
                           * d.engine.weight for d in fast)
            mean = weighted / sum(d.engine.weight for d in fast)
            assert torch.allclose(now, mean, rtol=1e-5, atol=1e-6)


def test_sync_daemons_with_reduce_scatter_equal_the_simulator(tmp_path: Path,
                                                               cluster_ca: ClusterCa) -> None:
    # Part messages over real gRPC with mutual TLS: the values to the owners, their means back.
    # peer-00 and peer-01 send every message over the bulk path (peerd/net/bulk.py) instead.
    daemons = start_loopback_daemons(tmp_path, 4, ["--rounds", "2", "--topology", "full",
                                                   "--sync", "--mu", "0.5", "--reduce-scatter"],
                                     cluster_ca,
                                     extra_by_position={0: ["--bulk-threshold", "1"],
                                                        1: ["--bulk-threshold", "1"]})
    try:
        assert wait_all(daemons) == [0, 0, 0, 0], [d.output() for d in daemons]
    finally:
        kill_all(daemons)
    torch.set_num_threads(1)  # the daemons train with one thread each
    config = SimConfig(peers=4, rounds=2, topology="full", mu=(0.5,), out="unused",
                       reduce_scatter=True)
    sim = build(config)
    for round_index in range(config.rounds):
        run_round(sim, round_index)
    for daemon, engine in zip(daemons, sim.engines, strict=True):
        saved = load_file(daemon.state_dir / "params.safetensors")
        differing = [name for name, tensor in engine.params.items()
                     if not torch.equal(saved[name], tensor)]
        assert not differing, (daemon.peer_id, differing)
        # Payload bytes, direct slices and part messages together, as the simulator counts.
        assert daemon.rounds()[-1]["bytes_sent_cum"] == sim.transport.bytes_sent[engine.peer_id]
    # The bulk path carried messages of exactly the two daemons told to use it.
    assert {sender for daemon in daemons
            for sender in re.findall(r"first bulk slice from (peer-\d+)", daemon.output())
            } == {"peer-00", "peer-01"}


class _PausedTopology:
    """The engine's real topology; its first call from a thread other than the test's waits
    for `go`, holding that thread inside `PartExchange.plan` between its look-up and its store
    (the window an offloaded plan, as trim_outbox's, leaves open)."""

    def __init__(self, topology: object, entered: threading.Event, go: threading.Event) -> None:
        self.topology = topology
        self.entered = entered
        self.go = go

    def neighbours(self, ids: list[str], peer: str) -> list[str]:
        if threading.current_thread() is not threading.main_thread() and not self.entered.is_set():
            self.entered.set()
            self.go.wait(10)
        return self.topology.neighbours(ids, peer)


def test_a_part_taken_while_an_offload_thread_plans_its_round_is_kept() -> None:
    """The stall of `bench exchange --reduce-scatter` (issue 26): a values part accepted on the
    loop while a thread planned the same round was dropped when that thread stored its empty
    state, and the owner waited for the part its sender saw acknowledged."""
    sim = build(dataclasses.replace(CONFIG, mu=(1.0,), reduce_scatter=True))
    receiver = sim.drivers[1]
    parts = receiver.parts
    engine = receiver.engine
    ctx = receiver.context(0)
    plan = plan_parts(engine.spec, engine.params, ctx, fully_connected=True)
    sender = sorted(plan.peers_to_hear(parts.peer_id, "values"))[0]
    sender_engine = next(d.engine for d in sim.drivers if d.peer_id == sender)
    values = values_for(plan, sender_engine.params, sender, parts.peer_id, engine.wire_dtype)
    entered, go = threading.Event(), threading.Event()
    engine.topology = _PausedTopology(engine.topology, entered, go)
    planner = threading.Thread(target=parts.plan, args=(ctx,))
    planner.start()
    assert entered.wait(10)
    release = threading.Timer(0.5, go.set)
    release.start()
    parts.accept_part(PartMessage("values", SliceMessage(sender, parts.peer_id, 0, 1.0, values)),
                      payload_bytes=1)
    planner.join(10)
    release.join()
    with pytest.raises(PartRefused, match="already arrived"):
        parts.expected_part("values", 0, sender, parts.peer_id)
