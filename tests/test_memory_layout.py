"""What a peer holds besides its parameters (issue 21, invariant 9): round snapshots are its own
slice and a budget caps them, a pull rebuilds each parameter only when the stream reaches it,
checkpoints are written one tensor at a time with the bytes safetensors writes, and the
inbox's bound follows the plans."""

from __future__ import annotations

import io

import torch
from safetensors.torch import save

from peerd.algorithm.driver import SNAPSHOTS_ALWAYS_KEPT, snapshot_bytes_held
from peerd.algorithm.submodel import param_bytes, slice_numel, with_slice
from peerd.config import SimConfig, TrainConfig
from peerd.net.codec import BuiltOnRead, encode_frames
from peerd.net.frames import serialize_frame
from peerd.sim import build, run_round
from peerd.tensorfile import write_safetensors
from peerd.v1 import peer_pb2

CONFIG = SimConfig(peers=4, rounds=3, topology="ring", mu=(0.25,), out="unused",
                   train=TrainConfig(max_local_steps=1))


def _simulated(rounds: int, snapshots_kept: int, budget: float):
    sim = build(CONFIG)
    for driver in sim.drivers:
        driver.snapshots_kept, driver.snapshot_budget_bytes = snapshots_kept, budget
    for round_index in range(rounds):
        run_round(sim, round_index)
    return sim


def test_snapshots_hold_the_own_slice_and_pulls_rebuild_the_parameters() -> None:
    sim = _simulated(2, snapshots_kept=4, budget=float("inf"))
    driver = sim.drivers[0]
    engine = driver.engine
    snapshot = driver.snapshots[2]
    plan = driver.context(1).plans_now[driver.peer_id]
    assert {name: t.numel() for name, t in snapshot.sliced.items()} == slice_numel(
        engine.spec, engine.params, plan)
    # At mu 0.25 a slice is a small part of the parameters (matrices mu^2, vectors mu).
    assert snapshot.nbytes < 0.3 * param_bytes(engine.params)
    # Nothing changed since round 2 ended: the rebuilt parameters are the parameters.
    for name, tensor in engine.params.items():
        assert torch.equal(with_slice(engine.spec, engine.params, plan, snapshot.sliced, name),
                           tensor)
    # The snapshot's own entries win over values changed since.
    name = max(engine.params, key=lambda n: engine.params[n].numel())
    changed = {**engine.params, name: torch.zeros_like(engine.params[name])}
    rebuilt = with_slice(engine.spec, changed, plan, snapshot.sliced, name)
    assert torch.count_nonzero(rebuilt) == snapshot.sliced[name].numel()


def test_the_snapshot_budget_drops_the_oldest_but_keeps_the_last_two() -> None:
    unlimited = _simulated(3, snapshots_kept=16, budget=float("inf")).drivers[0]
    assert sorted(unlimited.snapshots) == [1, 2, 3]
    one_slice = unlimited.snapshots[3].nbytes
    capped = _simulated(3, snapshots_kept=16, budget=one_slice).drivers[0]
    assert sorted(capped.snapshots) == [2, 3]  # over the budget, but never fewer than two
    counted = _simulated(3, snapshots_kept=1, budget=float("inf")).drivers[0]
    assert sorted(counted.snapshots) == [3]
    assert SNAPSHOTS_ALWAYS_KEPT == 2
    assert snapshot_bytes_held(10, 16, 35) == 35
    assert snapshot_bytes_held(10, 16, 5) == 20
    assert snapshot_bytes_held(10, 3, 1000) == 30


def test_a_stream_built_on_read_equals_one_of_the_tensors() -> None:
    tensors = {"b": torch.randn(300, 7), "a": torch.arange(10, dtype=torch.float32)}
    made: list[str] = []

    def make(name: str) -> torch.Tensor:
        made.append(name)
        return tensors[name].clone()

    lazy = BuiltOnRead({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, make)
    frames = encode_frames(peer_pb2.StreamHeader(sender="x"), lazy, chunk_bytes=512)
    assert made == []  # the header is built from the layouts alone
    lazy_bytes = [serialize_frame(f) for f in frames]
    assert made == ["b", "a"]
    eager = [serialize_frame(f) for f in encode_frames(peer_pb2.StreamHeader(sender="x"),
                                                        tensors, chunk_bytes=512)]
    assert lazy_bytes == eager


def test_checkpoint_files_are_the_bytes_safetensors_writes() -> None:
    tensors = {"w": torch.randn(4, 5), "b": torch.randn(5), "h": torch.randn(3).half()}
    handle = io.BytesIO()
    size, _ = write_safetensors(handle, tensors)
    assert handle.getvalue() == save(tensors)
    assert size == len(handle.getvalue())


def test_the_inbox_bound_follows_the_plans() -> None:
    sim = _simulated(1, snapshots_kept=2, budget=float("inf"))
    driver = sim.drivers[0]
    ctx = driver.context(1)
    per_round = sum(sum(driver.expected_counts(ctx, n).values()) for n in ctx.neighbours)
    assert driver.inbox_bound_bytes(ctx) == 2 * per_round * 4  # strict: this round and next
    assert 0 < per_round * 4 < param_bytes(driver.engine.params)
