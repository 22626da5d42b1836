"""Depth pruning with early exits: exits and depth in both models, plans that keep a prefix of
the blocks, aggregation only over the peers that hold a block, coverage with mixed depths."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from support import one_torch_thread  # noqa: F401 (autouse fixture)

from peerd.algorithm.aggregate import Arrival, exchange_count, merge, outbox
from peerd.algorithm.coverage import CoverageTracker
from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.submodel import extract, forward_flops_per_sample, init_params, write_back
from peerd.capacity import StepMemory, WidthProbe, choose_mu, depth_shapes, probe_width
from peerd.data import load_task_data
from peerd.models import (
    CNNConfig,
    CNNSpec,
    ModelSpec,
    TransformerConfig,
    TransformerSpec,
    check_table,
    full_units,
)
from peerd.models.base import DEPTH, plan_units
from peerd.net.discovery import PeerRecord
from peerd.ops.exporter import Exporter
from peerd.ops.status import format_status
from peerd.tasks import BLOCK_SIZE, get_task
from peerd.v1 import peer_pb2

CNN = CNNSpec(CNNConfig(image_size=8, stage_widths=(32, 64), blocks_per_stage=2,
                        early_exits=True))
LM = TransformerSpec(TransformerConfig(vocab_size=20, block_size=8, n_layer=3, n_head=4,
                                       head_dim=8, d_model=32, d_ffn=64, early_exits=True))
SPECS: dict[str, ModelSpec] = {"cnn": CNN, "lm": LM}


def plans_for(spec: ModelSpec, members: list[Member], round_index: int = 0):
    return make_planner("msfusion", 0).plan(round_index, members, spec.groups)


@pytest.mark.parametrize("name", SPECS)
def test_a_depth_d_submodel_keeps_the_first_d_blocks_and_their_exits(name: str) -> None:
    spec = SPECS[name]
    check_table(spec)
    blocks = spec.groups[DEPTH].units
    params = init_params(spec, 0)
    x = spec.example_input(3)
    out_shape = spec.build(full_units(spec))(x).shape
    for depth in range(1, blocks + 1):
        plan = plans_for(spec, [Member("a", 0.5, depth), Member("b", 0.5)])["a"]
        module = extract(spec, params, plan)
        kept = {n for n, _ in module.named_parameters()}
        assert kept == {n for n in spec.axes if spec.param_blocks.get(n, -1) < depth}
        logits = module.forward_exits(x)
        assert len(logits) == depth
        assert all(t.shape == out_shape for t in logits)
        # forward() is the deepest kept exit
        assert torch.equal(module(x), logits[-1])


def test_the_full_model_evaluates_at_its_deepest_exit() -> None:
    module = CNN.build(full_units(CNN))
    x = CNN.example_input(2)
    assert torch.equal(module(x), module.forward_exits(x)[-1])
    assert len(module.forward_exits(x)) == 4


@pytest.mark.parametrize("name", SPECS)
def test_flops_count_only_kept_blocks_and_exits(name: str) -> None:
    spec = SPECS[name]
    plans = plans_for(spec, [Member(str(d), 0.5, d) for d in range(1, spec.groups[DEPTH].units
                                                                     + 1)])
    flops = [forward_flops_per_sample(spec, plan_units(plans[str(d)]))
             for d in range(1, spec.groups[DEPTH].units + 1)]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)


def test_depth_outside_the_model_or_without_exits_is_refused() -> None:
    with pytest.raises(ValueError, match=r"depth 5 is outside 1\.\.4"):
        plans_for(CNN, [Member("a", 0.5, 5)])
    with pytest.raises(ValueError, match="depth 0 is outside"):
        plans_for(CNN, [Member("a", 0.5, 0)])
    plain = CNNSpec(CNNConfig(image_size=8))
    with pytest.raises(ValueError, match="needs a model with early exits"):
        plans_for(plain, [Member("a", 0.5, 1)])


def test_blocks_are_averaged_only_over_their_holders() -> None:
    """Full width, three peers: a (depth 4), b (depth 4), c (depth 1). Block 0 is the mean of
    all three; blocks 1..3 the mean of a and b only; at c they stay as they were."""
    members = [Member("a", 1.0), Member("b", 1.0), Member("c", 1.0, 1)]
    plans = plans_for(CNN, members)
    next_plans = plans_for(CNN, members, 1)
    values = {p: {n: torch.full_like(t, float(i + 1)) for n, t in init_params(CNN, 0).items()}
              for i, p in enumerate("abc")}
    before_c = {n: t.clone() for n, t in values["c"].items()}
    inboxes = {receiver: [Arrival(plans[sender], 1.0, outbox(CNN, values[sender], plans[sender],
                                                             plans[receiver], next_plans[receiver]))
                          for sender in "abc" if sender != receiver] for receiver in "abc"}
    for receiver in "abc":
        for sender_arrival, sender in zip(inboxes[receiver],
                                          [s for s in "abc" if s != receiver], strict=True):
            for name, sent in sender_arrival.values.items():
                expected = exchange_count(CNN, name, values[sender][name].shape, plans[sender],
                                          plans[receiver], next_plans[receiver])
                assert sent.numel() == expected
                if CNN.param_blocks.get(name, 0) >= 1 and "c" in (sender, receiver):
                    assert expected == 0
    for receiver in "abc":
        merge(CNN, values[receiver], plans[receiver], next_plans[receiver], 1.0,
              inboxes[receiver])
    for name in CNN.axes:
        block = CNN.param_blocks.get(name, 0)
        if block == 0:  # stem, block 0, exit 0: mean of 1, 2, 3
            for peer in "abc":
                assert torch.all(values[peer][name] == 2.0), (peer, name)
        else:  # deeper: mean of 1 and 2 at a and b; c untouched
            assert torch.all(values["a"][name] == 1.5) and torch.all(values["b"][name] == 1.5)
            assert torch.equal(values["c"][name], before_c[name])


@pytest.mark.parametrize("name", SPECS)
def test_mixed_depths_and_widths_cover_every_weight(name: str) -> None:
    """Mixed mu in {0.125, 0.25, 0.5} and mixed depths: every entry is trained within a bounded
    number of rounds, and the entries of a deep block only ever by the peers that keep it."""
    spec = SPECS[name]
    blocks = spec.groups[DEPTH].units
    members = [Member("p0", 0.5, blocks), Member("p1", 0.125, 1), Member("p2", 0.25, blocks),
               Member("p3", 0.5, 2), Member("p4", 0.125, blocks), Member("p5", 0.25, 1)]
    params = init_params(spec, 0)
    coverage = CoverageTracker(spec, params)
    deep = CoverageTracker(spec, params)
    # Full coverage takes 36 (cnn) and 38 (lm) rounds with seed 0 and the default drift
    # period (64).
    for round_index in range(60):
        plans = plans_for(spec, members, round_index)
        coverage.record(plans.values())
        deep.record(plans[m.peer_id] for m in members if m.depth == blocks)
        for member in members:
            assert plans[member.peer_id][DEPTH].tolist() == list(range(member.depth))
    assert coverage.untrained() == {}
    last_block = {n for n, b in spec.param_blocks.items() if b == blocks - 1}
    assert not set(deep.untrained()) & last_block


def test_write_back_of_a_shallow_submodel_leaves_deep_blocks_alone() -> None:
    params = init_params(CNN, 0)
    before = {n: t.clone() for n, t in params.items()}
    plan = plans_for(CNN, [Member("a", 0.5, 2), Member("b", 0.5)])["a"]
    module = extract(CNN, params, plan)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(1.0)
    write_back(CNN, params, plan, module)
    for name in CNN.axes:
        changed = not torch.equal(params[name], before[name])
        assert changed == (CNN.param_blocks.get(name, 0) < 2), name


def test_capacity_prefers_freezing_then_fewer_blocks_before_a_narrower_width() -> None:
    MiB = 2**20

    def probe(mu: float, depth: int, frozen: int, mib: float) -> WidthProbe:
        return WidthProbe(mu, 0.1, StepMemory(int(mib * MiB), 0, 0, 0), depth, frozen)

    assert depth_shapes(3) == [(3, 0), (3, 1), (3, 2), (2, 0), (1, 0)]
    probes = [probe(0.5, d, f, 40 - 5 * i) for i, (d, f) in enumerate(depth_shapes(3))]
    probes += [probe(0.25, d, f, 10 - i) for i, (d, f) in enumerate(depth_shapes(3))]
    choose = [(c.mu, c.depth, c.frozen) for c in (
        choose_mu(probes, 100 * MiB, budget * MiB, 10, None) for budget in (140, 135, 121, 111))]
    assert choose == [(0.5, 3, 0), (0.5, 3, 1), (0.5, 1, 0), (0.25, 3, 0)]


def test_probed_memory_falls_with_freezing_and_with_depth() -> None:
    data = load_task_data("digits", None, block_size=BLOCK_SIZE)
    spec = get_task("digits").model(data, early_exits=True)
    config = replace(get_task("digits").train, early_exits=True)
    params = init_params(spec, 0)
    memory = {(d, f): probe_width(spec, params, data.train, config, 0.25, 1, d, f).memory
              for d, f in depth_shapes(2)}
    assert memory[(2, 1)].total_bytes < memory[(2, 0)].total_bytes
    assert memory[(1, 0)].total_bytes < memory[(2, 0)].total_bytes
    assert memory[(2, 1)].optimizer_bytes < memory[(2, 0)].optimizer_bytes
    assert memory[(1, 0)].param_bytes < memory[(2, 0)].param_bytes


def test_status_and_exporter_show_depth_and_frozen_blocks() -> None:
    reply = peer_pb2.StatusReply(
        self=peer_pb2.Hello(peer_id="a", address="h:1", members=["a", "b"],
                            capacity=peer_pb2.Capacity(mu=0.5, depth=2, frozen_blocks=1)),
        peers=[peer_pb2.PeerStatus(peer_id="b", address="h:2", position=1,
                                   capacity=peer_pb2.Capacity(mu=0.25))])
    rows = {line.split()[1]: line.split() for line in format_status(reply).splitlines()[4:]}
    assert rows["a"][4] == "2/1" and rows["b"][4] == "all/0"
    text = Exporter("a", "lab", "fp", 0.5, 2, 1).render().decode()
    assert "peerd_depth 2.0" in text and "peerd_frozen_blocks 1.0" in text
    assert "peerd_depth 0.0" in Exporter("b", "lab", "fp", 0.25).render().decode()


def test_the_txt_record_carries_depth_only_where_set() -> None:
    record = PeerRecord("a", "lab", 1, "fp", 0.5, "10.0.0.1", 7470, depth=2)
    txt = record.to_txt()
    assert txt["depth"] == "2"
    assert PeerRecord.from_txt(txt, "10.0.0.1", 7470) == record
    plain = PeerRecord("a", "lab", 1, "fp", 0.5, "10.0.0.1", 7470)
    assert "depth" not in plain.to_txt()
    assert PeerRecord.from_txt(plain.to_txt(), "10.0.0.1", 7470).depth is None
    with pytest.raises(ValueError, match="TXT key 'depth' is not an integer: 'x'"):
        PeerRecord.from_txt({**txt, "depth": "x"}, "10.0.0.1", 7470)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        PeerRecord.from_txt({**txt, "depth": "0"}, "10.0.0.1", 7470)
