"""`peerd bench compute`: a small real run, the memory accounting, the step is the engine's."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn

from peerd.bench.compute import measure_step, sgd, train_step
from peerd.config import TrainConfig
from peerd.data import load_task_data
from peerd.engine import Engine
from peerd.models import CNNConfig, CNNSpec
from peerd.plan import Member, make_planner
from peerd.submodel import extract, init_params, write_back
from peerd.topology import load_topology

KEYS = {"task", "mu", "step_ms", "step_ratio", "flops_ratio", "memory_bytes", "memory_ratio",
        "activation_bytes", "params"}


def test_small_run_reports_every_key() -> None:
    # Through the CLI, as BENCHMARKS.md documents it.
    result = subprocess.run(
        [sys.executable, "-c", "from peerd.cli import main; main()", "bench", "compute",
         "--task", "fmnist", "--mu", "0.5", "--steps", "2", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["threads"] == 1
    full, half = report["results"]
    assert set(full) >= KEYS and set(half) >= KEYS
    assert (full["task"], full["mu"], half["task"], half["mu"]) == ("fmnist", 1.0, "fmnist", 0.5)
    assert full["step_ratio"] == full["flops_ratio"] == full["memory_ratio"] == 1.0
    assert 0.2 < half["flops_ratio"] < 0.35  # about mu^2
    assert half["step_ms"] > 0 and half["steps"] == 2
    for row in (full, half):
        # SGD with momentum: one gradient and one momentum buffer per parameter, float32.
        assert row["param_bytes"] == row["grad_bytes"] == row["optimizer_bytes"] \
            == 4 * row["params"]
        assert row["memory_bytes"] == 3 * 4 * row["params"] + row["activation_bytes"]
    assert 0 < half["activation_bytes"] < full["activation_bytes"]
    assert half["memory_ratio"] < 1.0


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
