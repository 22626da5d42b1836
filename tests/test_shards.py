"""Sharded parameters (issue 21 item 6): the placement rule, the stores and the sharded round.

Placement: every block has exactly r storers for any member set, a leave or join moves about
the blocks it must, a store stays within its bound on real tensors. Round: no peer ever holds
more than its bound, whatever other peers send; at full width with r = N the stores equal
today's full-topology mean bit for bit; a member dropping loses nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peerd.algorithm.sharded import Push, ShardRefused, Window
from peerd.algorithm.shards import (
    BlockLayout,
    ShardStore,
    assemble_stores,
    load_store,
    moved_blocks,
    place,
    replicate,
    save_store,
    seed_stores,
)
from peerd.algorithm.submodel import init_params
from peerd.config import ConfigError, SimConfig, TrainConfig
from peerd.peer import load_data
from peerd.sim import build, run_round
from peerd.sim_sharded import build_cluster, run_sharded
from peerd.state import CheckpointMismatch
from peerd.tasks import get_task

torch.set_num_threads(1)


def members(count: int) -> list[str]:
    return [f"peer-{i:02d}" for i in range(count)]


@pytest.mark.parametrize("blocks", [1, 7, 100, 1000])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_every_block_has_exactly_r_storers(blocks: int, count: int, replicas: int) -> None:
    if replicas > count:
        with pytest.raises(ValueError, match=f"storage_replicas={replicas} is invalid"):
            place(blocks, members(count), replicas, seed=0)
        return
    placement = place(blocks, members(count), replicas, seed=0)
    assert placement.capacity == math.ceil(replicas * blocks / count)
    for holders in placement.storers:
        assert len(holders) == replicas == len(set(holders))
    loads = [len(placement.blocks_of(m)) for m in members(count)]
    assert sum(loads) == replicas * blocks
    assert max(loads) <= placement.capacity


@pytest.mark.parametrize(("count", "replicas"), [(4, 2), (8, 2), (5, 3), (16, 2)])
def test_leave_and_join_move_little_more_than_they_must(count: int, replicas: int) -> None:
    """A leave must re-place the leaver's blocks, a join must give the joiner its share; the
    bounded-load cascade moves a few more (measured: 1.0x-1.22x the minimum)."""
    before = place(1000, members(count), replicas, seed=3)
    leaver = members(count)[1]
    after = place(1000, [m for m in members(count) if m != leaver], replicas, seed=3)
    must = len(before.blocks_of(leaver))
    moved = sum(len(blocks) for blocks in moved_blocks(before, after).values())
    assert must <= moved <= 1.3 * must
    joined = place(1000, [*members(count), "peer-99"], replicas, seed=3)
    must = len(joined.blocks_of("peer-99"))
    moved = sum(len(blocks) for blocks in moved_blocks(before, joined).values())
    assert must <= moved <= 1.3 * must


@pytest.mark.parametrize(("count", "replicas"), [(2, 2), (4, 2), (5, 3), (7, 2)])
def test_store_bytes_within_bound_on_real_tensors(count: int, replicas: int) -> None:
    config = SimConfig(task="digits", peers=count)
    spec = get_task("digits").model(load_data(config), False)
    params = init_params(spec, 0)
    layout = BlockLayout.of(params)
    placement = place(layout.blocks, members(count), replicas, seed=0)
    stores = {m: ShardStore(layout, m) for m in members(count)}
    seed_stores(layout, placement, params, stores)
    params_bytes = sum(t.nbytes for t in params.values())
    assert layout.params_bytes == params_bytes
    share = replicas / count * params_bytes
    for store in stores.values():
        stored = sum(values.nbytes for values in store.blocks.values())
        assert stored == store.nbytes() <= placement.storer_bound_bytes(layout)
        # In general the bound is the share plus under two blocks (capacity rounds up, the
        # last block is short); for these member sets it is under one.
        assert placement.storer_bound_bytes(layout) <= share + 2 * layout.block_bytes
        assert stored <= share + layout.block_bytes
    assembled = assemble_stores(layout, placement, stores)
    assert all(torch.equal(assembled[name], params[name]) for name in params)


def small_config(**options: object) -> SimConfig:
    defaults: dict[str, object] = {"task": "digits", "peers": 4, "mu": (0.25,),
                                   "storage_replicas": 2, "rounds": 3, "out": "unused"}
    return SimConfig(**{**defaults, **options})  # type: ignore[arg-type]


def test_no_peer_holds_more_than_its_bound_and_drop_loses_nothing() -> None:
    config = small_config(train=TrainConfig(max_local_steps=4))
    cluster = build_cluster(config, load_data(config))
    params_bytes = cluster.layout.params_bytes
    for round_index in range(2):
        plans, _ = cluster.run_round(round_index)
        for peer_id, peer in cluster.peers.items():
            bound = cluster.bound_bytes(plans[peer_id])
            assert 0 < peer.peak_bytes <= bound < params_bytes, (peer_id, peer.peak_bytes, bound)
            assert peer.storer.store.nbytes() <= cluster.placement.storer_bound_bytes(
                cluster.layout)
    before = cluster.assemble()
    copied = cluster.remove("peer-02")
    assert copied > 0 and cluster.replicated_bytes == copied * 4
    assert sorted(cluster.peers) == ["peer-00", "peer-01", "peer-03"]
    after = cluster.assemble()
    assert all(torch.equal(before[name], after[name]) for name in before)
    for block, holders in enumerate(cluster.placement.storers):
        assert len(holders) == 2
        first, second = (cluster.peers[h].storer.store.get(block) for h in holders)
        assert torch.equal(first, second)
    for peer in cluster.peers.values():
        assert set(peer.storer.store.blocks) == set(cluster.placement.blocks_of(peer.peer_id))
    plans, stats = cluster.run_round(2)
    assert len(stats) == 3 and all(math.isfinite(s.loss) for s in stats)
    for peer_id, peer in cluster.peers.items():
        assert peer.peak_bytes <= cluster.bound_bytes(plans[peer_id])


def test_storer_refuses_what_the_plans_do_not_give() -> None:
    """Oversized, repeated, other-round, stranger, wrong-dtype and non-finite pushes, and a
    pull once pushes began, are refused with the reason, and the store is left as it was."""
    config = small_config(train=TrainConfig(max_local_steps=1))
    cluster = build_cluster(config, load_data(config))
    members_now = cluster.members
    contexts = {p: cluster.peers[p].engine.begin_round(0, members_now) for p in cluster.peers}
    plans = contexts["peer-00"].plans_now
    for peer in cluster.peers.values():
        peer.storer.begin_round(0, plans, cluster.placement)
    storer = cluster.peers["peer-01"].storer
    stored_before = {b: v.clone() for b, v in storer.store.blocks.items()}
    expected = sum(storer.expected_counts("peer-00").values())
    assert expected > 0

    def push(sender: str = "peer-00", round_index: int = 0, count: int = expected,
             dtype: torch.dtype = torch.float32, fill: float = 1.0) -> Push:
        return Push(sender, "peer-01", round_index, 100.0, torch.full((count,), fill,
                                                                        dtype=dtype))

    refused = [
        (push(count=expected + 1), "values, the plans say"),
        (push(count=10 * expected), "values, the plans say"),
        (push(round_index=1), "is for round 1"),
        (push(round_index=7), "is for round 7"),
        (push(sender="stranger"), "not a member"),
        (push(dtype=torch.float64), "float64"),
        (push(fill=float("nan")), "non-finite"),
    ]
    for message, reason in refused:
        with pytest.raises(ShardRefused, match=reason):
            storer.accept_push(message)
    for round_index in range(1, 64):  # a peer racing ahead: many rounds, none queued
        with pytest.raises(ShardRefused, match=f"is for round {round_index}"):
            storer.accept_push(push(round_index=round_index))
    assert all(torch.equal(storer.store.blocks[b], v) for b, v in stored_before.items())
    assert storer.held_bytes() == storer.store.nbytes()
    storer.accept_push(push())
    with pytest.raises(ShardRefused, match="already pushed"):
        storer.accept_push(push())
    block = next(iter(storer.store.blocks))
    with pytest.raises(ShardRefused, match="pushes have begun"):
        storer.serve_pull("peer-02", 0, block)
    assert storer.held_bytes() <= storer.store.nbytes() + cluster.placement.capacity * \
        cluster.layout.block_entries


@pytest.mark.parametrize(("peers", "rounds", "compared"), [(2, 2, 2), (4, 1, 1)])
def test_full_width_with_every_peer_storing_equals_todays_full_topology_mean(
        peers: int, rounds: int, compared: int) -> None:
    """mu 1, r = N: every store equals today's simulator over the full topology bit for bit.
    Storers sum in ascending trainer order, the order of today's merge at the lowest id: with
    2 peers every peer of today's agrees to the bit round after round, with 4 the others'
    merges sum in another order (last bits differ), so only peer-00 is compared, after 1
    round."""
    train = TrainConfig(max_local_steps=3)
    today = build(SimConfig(task="digits", peers=peers, mu=(1.0,), topology="full",
                            rounds=rounds, out="unused", train=train))
    config = small_config(peers=peers, mu=(1.0,), storage_replicas=peers, topology="full",
                          train=train)
    cluster = build_cluster(config, load_data(config))
    for round_index in range(rounds):
        run_round(today, round_index)
        cluster.run_round(round_index)
        for engine in today.engines[:compared]:
            for storer_id, peer in cluster.peers.items():
                stored = assemble_stores(cluster.layout, cluster.placement,
                                         {storer_id: peer.storer.store})
                for name, tensor in engine.params.items():
                    assert torch.equal(stored[name], tensor), (round_index, name, storer_id)
    today.loop.close()


def test_window_counts_cover_exactly_the_sub_model() -> None:
    config = small_config()
    cluster = build_cluster(config, load_data(config))
    plans = cluster.peers["peer-00"].engine.begin_round(0, cluster.members).plans_now
    for plan in plans.values():
        held = sum(Window(cluster.spec, cluster.layout, plan).counts().values())
        assert held * cluster.layout.entry_bytes == cluster.window_bytes(plan)


def test_sharded_sim_learns_digits(tmp_path: Path) -> None:
    """4 peers at mu 0.25, r = 2: the assembled model of the stores learns."""
    records = run_sharded(small_config(rounds=3, out=str(tmp_path)), plot=False)
    last = records[-1]
    assert last["global_acc"] > 0.6, last["global_acc"]
    assert last["held_bytes_peak_max"] <= last["held_bytes_bound_max"] < last["params_bytes"]
    assert last["pull_bytes_cum"] > 0 and last["push_bytes_cum"] == 2 * last["pull_bytes_cum"]


def test_storage_replicas_is_checked() -> None:
    with pytest.raises(ConfigError, match="storage_replicas=5 is invalid"):
        small_config(storage_replicas=5)
    with pytest.raises(ConfigError, match=r"contrastive is not supported .*: a sharded peer"):
        small_config(contrastive=True)
    with pytest.raises(ConfigError, match="reduce_scatter is not supported"):
        small_config(reduce_scatter=True, topology="full")
    with pytest.raises(ConfigError, match="storage_replicas=-1 is invalid"):
        small_config(storage_replicas=-1)



def digits_params() -> dict[str, torch.Tensor]:
    spec = get_task("digits").model(load_data(SimConfig(task="digits")), False)
    return init_params(spec, 0)


def test_join_rebalances_from_the_replicas() -> None:
    """A fifth member joins 4 stores (r 2): it copies its share from the old storers, the
    others drop what they no longer store, and every entry is still there."""
    params = digits_params()
    layout = BlockLayout.of(params)
    before = place(layout.blocks, members(4), 2, seed=0)
    stores = {m: ShardStore(layout, m) for m in members(5)}
    seed_stores(layout, before, params, stores)
    after = place(layout.blocks, members(5), 2, seed=0)
    copied = replicate(before, after, stores)
    joined = after.blocks_of("peer-04")
    assert copied >= sum(layout.block_size(b) for b in joined) > 0
    for member, store in stores.items():
        assert set(store.blocks) == set(after.blocks_of(member))
        assert store.nbytes() <= after.storer_bound_bytes(layout)
    assembled = assemble_stores(layout, after, stores)
    assert all(torch.equal(assembled[name], params[name]) for name in params)


def test_losing_every_storer_of_a_block_is_refused_before_any_change() -> None:
    params = digits_params()
    layout = BlockLayout.of(params)
    before = place(layout.blocks, members(4), 2, seed=0)
    stores = {m: ShardStore(layout, m) for m in members(4)}
    seed_stores(layout, before, params, stores)
    gone = before.storers[0]
    survivors = {m: s for m, s in stores.items() if m not in gone}
    held = {m: set(s.blocks) for m, s in survivors.items()}
    after = place(layout.blocks, list(survivors), 2, seed=0)
    with pytest.raises(LookupError, match="block 0 is lost"):
        replicate(before, after, survivors)
    assert {m: set(s.blocks) for m, s in survivors.items()} == held


def test_store_checkpoints_restore_the_model(tmp_path: Path) -> None:
    config = small_config(train=TrainConfig(max_local_steps=2))
    cluster = build_cluster(config, load_data(config))
    cluster.run_round(0)
    trained = cluster.assemble()
    for peer_id, peer in cluster.peers.items():
        assert save_store(tmp_path / peer_id, 1, peer.storer.store, cluster.placement,
                          config.seed) >= peer.storer.store.nbytes()
    loaded = {}
    for peer_id in cluster.peers:
        found = load_store(tmp_path / peer_id, cluster.layout, cluster.placement, peer_id,
                           config.seed)
        assert found is not None and found[0] == 1
        loaded[peer_id] = found[1]
    restored = assemble_stores(cluster.layout, cluster.placement, loaded)
    assert all(torch.equal(restored[name], trained[name]) for name in trained)
    other = place(cluster.layout.blocks, members(3), 2, seed=0)
    with pytest.raises(CheckpointMismatch,
                       match=r"fits the placement over members peer-00, peer-01, peer-02 "):
        load_store(tmp_path / "peer-00", cluster.layout, other, "peer-00", config.seed)
    assert load_store(tmp_path / "nothing", cluster.layout, cluster.placement, "peer-00",
                      config.seed) is None


def test_two_members_leave_at_once_with_three_replicas() -> None:
    """5 peers of mixed widths, r 3: two leave together, nothing is lost, training goes on."""
    config = small_config(peers=5, mu=(0.25, 0.5), storage_replicas=3,
                          train=TrainConfig(max_local_steps=2))
    cluster = build_cluster(config, load_data(config))
    cluster.run_round(0)
    before = cluster.assemble()
    assert cluster.remove("peer-01", "peer-03") > 0
    after = cluster.assemble()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(len(holders) == 3 for holders in cluster.placement.storers)
    plans, _ = cluster.run_round(1)
    for peer_id, peer in cluster.peers.items():
        assert peer.peak_bytes <= cluster.bound_bytes(plans[peer_id])


def test_sim_command_with_storage_replicas(tmp_path: Path) -> None:
    """`peerd sim --storage-replicas` as a user runs it, and a value it refuses."""
    command = [sys.executable, "-m", "peerd.cli", "sim", "--task", "digits", "--peers", "3",
               "--mu", "0.5", "--rounds", "1", "--storage-replicas", "2", "--quiet"]
    done = subprocess.run([*command, "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["storage_replicas"] == 2 and record["global_acc"] > 0.1
    assert 0 < record["held_bytes_peak_max"] <= record["held_bytes_bound_max"]
    refused = subprocess.run([*command[:-3], "--storage-replicas", "4", "--out",
                              str(tmp_path / "no")], capture_output=True, text=True,
                             timeout=300, check=False)
    assert refused.returncode == 2
    assert "storage_replicas=4 is invalid: must be at most the 3 peers" in refused.stderr
