"""peerd.capacity: sizes, available memory, the measured training step, and the choice of
width for `--mu auto`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from peerd.algorithm.engine import Engine, sgd, train_step
from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.submodel import extract, init_params, write_back
from peerd.algorithm.topology import load_topology
from peerd.capacity import (
    MU_CHOICES,
    RUNTIME_MARGIN_BYTES,
    CapacityError,
    StepMemory,
    WidthProbe,
    available_memory_bytes,
    choose_mu,
    floor_bytes,
    measure_capacity,
    measure_step,
    probe_width,
    resident_bytes,
    steps_per_round,
)
from peerd.config import TrainConfig
from peerd.data import load_task_data
from peerd.models import CNNConfig, CNNSpec
from peerd.tasks import get_task

MiB = 2**20


def ten_slices(slice_bytes: int) -> int:
    return 10 * slice_bytes


def test_available_memory_is_the_lower_of_the_kernel_and_the_cgroup(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    2000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_memory_bytes(meminfo, cgroup) == 2_000_000 * 1024  # no cgroup files
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    assert available_memory_bytes(meminfo, cgroup) == 2_000_000 * 1024  # unlimited
    (cgroup / "memory.max").write_text(f"{1024 * MiB}\n")
    (cgroup / "memory.current").write_text(f"{300 * MiB}\n")
    assert available_memory_bytes(meminfo, cgroup) == 724 * MiB
    meminfo.write_text("MemTotal:       24000000 kB\n")
    with pytest.raises(CapacityError, match="--memory-budget"):
        available_memory_bytes(meminfo, cgroup)


def test_this_machine_reports_memory() -> None:
    assert available_memory_bytes() > 0
    assert 10 * MiB < resident_bytes() < 8 * 2**30


def probe(mu: float, step_s: float, step_mib: float) -> WidthProbe:
    return WidthProbe(mu, step_s, StepMemory(int(step_mib * MiB), 0, 0, 0))


PROBES = [probe(0.5, 0.040, 40), probe(0.25, 0.012, 12), probe(0.125, 0.005, 5),
          probe(0.0625, 0.003, 2)]


def test_the_widest_width_that_fits_the_budget() -> None:
    assert choose_mu(PROBES, 100 * MiB, 200 * MiB, 10, None).mu == 0.5
    assert choose_mu(PROBES, 100 * MiB, 140 * MiB, 10, None).mu == 0.5  # exactly full
    assert choose_mu(PROBES, 100 * MiB, 139 * MiB, 10, None).mu == 0.25
    assert choose_mu(PROBES, 100 * MiB, 103 * MiB, 10, None).mu == 0.0625


def test_a_budget_no_width_fits_names_both_figures() -> None:
    with pytest.raises(CapacityError, match=r"budget 101 MiB is too small: even mu 0.0625 "
                                            r"needs about 102 MiB \(100 MiB held"):
        choose_mu(PROBES, 100 * MiB, 101 * MiB, 10, None)


def test_the_round_target_narrows_the_width_and_is_soft() -> None:
    # 100 steps a round: 4.0, 1.2, 0.5 and 0.3 s.
    choice = choose_mu(PROBES, 100 * MiB, 1000 * MiB, 100, 1.5)
    assert (choice.mu, choice.round_s) == (0.25, pytest.approx(1.2))
    assert choose_mu(PROBES, 100 * MiB, 1000 * MiB, 100, 4.0).mu == 0.5
    # Nothing is fast enough: the narrowest that fits the memory, not an error.
    assert choose_mu(PROBES, 100 * MiB, 1000 * MiB, 100, 0.1).mu == 0.0625
    # Memory still rules: 0.5 would be in time but does not fit.
    assert choose_mu(PROBES, 100 * MiB, 120 * MiB, 100, 10.0).mu == 0.25


def test_steps_per_round_follows_the_engine() -> None:
    assert steps_per_round(100, TrainConfig(batch_size=32)) == 4
    assert steps_per_round(100, TrainConfig(batch_size=32, local_epochs=2)) == 8
    assert steps_per_round(100, TrainConfig(batch_size=32, local_epochs=2,
                                            max_local_steps=5)) == 5


def test_probes_of_a_real_model_grow_with_the_width() -> None:
    torch.set_num_threads(1)
    task = get_task("fmnist")
    data = load_task_data("fmnist")
    spec = task.model(data)
    params = init_params(spec, 0)
    before = {name: t.clone() for name, t in params.items()}
    split = data.train.subset(torch.arange(512).numpy())
    probes = [probe_width(spec, params, split, task.train, mu, steps=2) for mu in MU_CHOICES]
    sizes = [p.memory.total_bytes for p in probes]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert all(p.step_s > 0 for p in probes)
    # The probe trains copies: the daemon's parameters are untouched.
    assert all(torch.equal(before[name], params[name]) for name in params)
    choice = measure_capacity(spec, params, split, task.train, None, None, held_bytes=ten_slices)
    assert choice.mu == 0.5  # this machine has gigabytes to spare for a small CNN
    assert choice.fixed_bytes > resident_bytes() // 2
    with pytest.raises(CapacityError, match="too small"):
        measure_capacity(spec, params, split, task.train, 1 * MiB, None, held_bytes=ten_slices)


def test_a_width_whose_parameters_alone_exceed_the_budget_is_never_trained() -> None:
    """Probing mu 0.5 to learn that it does not fit was what could get a daemon killed under a
    kernel limit (its probe was the process's peak): a shape whose parameters and held slices
    already exceed the budget is skipped, the narrower ones are probed and chosen from."""
    torch.set_num_threads(1)
    task = get_task("kjv")
    data = load_task_data("kjv")
    spec = task.model(data)
    params = init_params(spec, 0)

    def forty_slices(slice_bytes: int) -> int:  # wide gaps between the widths' floors
        return 40 * slice_bytes

    floors = {mu: floor_bytes(spec, params, mu, held_bytes=forty_slices) for mu in MU_CHOICES}
    assert floors[0.5] - floors[0.25] > 80 * MiB  # far beyond what resident memory wanders
    budget = resident_bytes() + RUNTIME_MARGIN_BYTES + (floors[0.5] + floors[0.25]) // 2
    choice = measure_capacity(spec, params, data.train.subset(torch.arange(64).numpy()),
                              task.train, budget, None, held_bytes=forty_slices)
    assert sorted({probe.mu for probe in choice.probes}) == [0.0625, 0.125, 0.25]
    assert choice.mu == 0.25


def test_memory_of_one_linear_step_is_exact() -> None:
    torch.manual_seed(0)
    module = nn.Linear(8, 4)
    inputs = torch.randn(5, 8)

    def step(optimizer: torch.optim.Optimizer) -> None:
        loss = module(inputs).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    numel = 8 * 4 + 4
    with_momentum = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    memory = measure_step(lambda: step(with_momentum), module, with_momentum)
    assert memory.param_bytes == memory.grad_bytes == memory.optimizer_bytes == numel * 4
    # addmm saves its input for the weight's gradient, and the weight, which is not counted
    # again; the sum saves nothing.
    assert memory.activation_bytes == inputs.numel() * 4
    assert memory.total_bytes == 3 * numel * 4 + inputs.numel() * 4
    plain = torch.optim.SGD(module.parameters(), lr=0.1)
    assert measure_step(lambda: step(plain), module, plain).optimizer_bytes == 0


def test_the_step_is_the_engines() -> None:
    # One step of Engine.train and one bench step from the same parameters, plan and batch
    # give the same bits.
    spec = CNNSpec(CNNConfig(image_size=8, stage_widths=(16, 32)))
    data = load_task_data("digits")
    config = TrainConfig(lr=0.05, batch_size=16, max_local_steps=1, grad_clip=1.0)
    split = data.train.subset(torch.arange(64).numpy())
    initial = init_params(spec, 5)
    engine = Engine("p0", spec, {n: t.clone() for n, t in initial.items()}, split, split,
                    make_planner("msfusion", 5), load_topology("ring"), config, seed=5)
    ctx = engine.begin_round(2, [Member("p0", 0.5), Member("p1", 0.5)])
    engine.train(ctx)

    plan = engine.own_plan(ctx)
    module = extract(spec, initial, plan)
    module.train()
    batch = engine._batch_order(2)[:config.batch_size]
    train_step(spec.kind, config, module, sgd(module, config), split.inputs[batch],
               split.targets[batch])
    write_back(spec, initial, plan, module)
    for name, value in engine.params.items():
        assert torch.equal(initial[name], value), name
