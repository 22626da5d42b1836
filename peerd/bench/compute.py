"""`peerd bench compute`: the training step time and memory of sub-models against the full model.

For each task model (the Fashion-MNIST CNN, the King James Bible transformer LM) and each width
ratio mu, the sub-model is what a peer trains: `extract` of the full parameters under the
msfusion planner's plan for one member of capacity mu. Its training step is the one
`Engine.train` runs (forward, task loss, backward, gradient clipping where the task clips, SGD
with the task's settings) on batches of the task's real training data at the task's batch size.

Timing: warm-up steps, then `steps` timed steps per width, the widths taken in turn (mu 1, the
largest mu, ..., the smallest, mu 1, ...) so that load from other jobs on the machine hits all
of them alike; the median is reported. Memory is measured on the first step of each width:
parameters, gradients and optimizer state (momentum buffers) as allocated, and the tensors
autograd saves for backward, counted through `saved_tensors_hooks` (distinct storages, the
parameters' own excluded: they are already counted).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from peerd.algorithm.engine import sgd, train_step
from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.submodel import extract, forward_flops_per_sample, init_params, parameter_count
from peerd.bench.processes import positive_int, print_result
from peerd.capacity import StepMemory, measure_step
from peerd.config import ConfigError, TrainConfig, parse_mu
from peerd.data import load_task_data
from peerd.models.base import ModelSpec, plan_units
from peerd.tasks import BLOCK_SIZE, get_task

TASK_NAMES = ("fmnist", "kjv")
DEFAULT_MUS = (0.125, 0.25, 0.5)
# Widths only matter through their sizes; msfusion, the default method, cuts ceil(mu * K) units
# from every group, as every planner does, so its sub-models are the ones peers train.
METHOD = "msfusion"
SEED = 0
WARMUP_STEPS = 3
PROFILED_STEPS = 5


# ---- one width of one task ---------------------------------------------------------------------


class Width:
    """The sub-model of one task at one mu, its optimizer and its batches."""

    def __init__(
        self, task: str, mu: float, spec: ModelSpec, params: dict[str, torch.Tensor],
        config: TrainConfig, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self.task = task
        self.mu = mu
        self.spec = spec
        self.config = config
        plan = make_planner(METHOD, SEED).plan(0, [Member("bench", mu)], spec.groups)["bench"]
        self.units = plan_units(plan)
        self.module = extract(spec, params, plan)
        self.module.train()
        self.optimizer = sgd(self.module, config)
        self.batches = batches
        self.steps_run = 0
        self.seconds: list[float] = []

    def step(self) -> None:
        inputs, targets = self.batches[self.steps_run % len(self.batches)]
        self.steps_run += 1
        train_step(self.spec.kind, self.config, self.module, self.optimizer, inputs, targets)

    def timed_step(self) -> None:
        start = time.perf_counter()
        self.step()
        self.seconds.append(time.perf_counter() - start)


def task_widths(task: str, mus: Sequence[float], batches: int) -> list[Width]:
    """mu 1 first, then the given widths from the largest down, sharing the same batches."""
    definition = get_task(task)
    data = load_task_data(task, block_size=BLOCK_SIZE)
    spec = definition.model(data)
    config = definition.train
    params = init_params(spec, SEED)
    generator = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(data.train), generator=generator)
    # Index tensors, as the engine's batches are: each batch is a copy, not a view of the set.
    picked = [order[i * config.batch_size:(i + 1) * config.batch_size] for i in range(batches)]
    samples = [(data.train.inputs[index], data.train.targets[index]) for index in picked]
    widths = sorted({1.0, *mus}, reverse=True)
    return [Width(task, mu, spec, params, config, samples) for mu in widths]


# ---- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WidthResult:
    task: str
    mu: float
    step_s: float  # median
    steps: int
    params: int
    flops_per_sample: int
    memory: StepMemory


@dataclass(frozen=True)
class ComputeResult:
    threads: int
    load_average: tuple[float, float, float]  # at the end of the run
    widths: tuple[WidthResult, ...]

    def _full(self, task: str) -> WidthResult:
        return next(w for w in self.widths if w.task == task and w.mu == 1.0)

    def rows(self) -> list[dict[str, float | int | str]]:
        rows = []
        for width in self.widths:
            full = self._full(width.task)
            rows.append({
                "task": width.task,
                "mu": width.mu,
                "step_ms": round(width.step_s * 1e3, 3),
                "step_ratio": round(width.step_s / full.step_s, 4),
                "flops_ratio": round(width.flops_per_sample / full.flops_per_sample, 4),
                "memory_bytes": width.memory.total_bytes,
                "memory_ratio": round(width.memory.total_bytes / full.memory.total_bytes, 4),
                "activation_bytes": width.memory.activation_bytes,
                "param_bytes": width.memory.param_bytes,
                "grad_bytes": width.memory.grad_bytes,
                "optimizer_bytes": width.memory.optimizer_bytes,
                "params": width.params,
                "flops_per_sample": width.flops_per_sample,
                "steps": width.steps,
            })
        return rows

    def to_json(self) -> dict[str, object]:
        return {"threads": self.threads, "load_average": list(self.load_average),
                "results": self.rows()}

    def describe(self) -> str:
        lines = [
            f"torch threads {self.threads}; load average at the end "
            + " ".join(f"{x:.2f}" for x in self.load_average),
            f"{'task':<7} {'mu':>6} {'step ms':>9} {'/full':>7} {'flops/full':>10} "
            f"{'memory MiB':>10} {'/full':>7} {'saved MiB':>9} {'params':>9}",
        ]
        for row in self.rows():
            lines.append(
                f"{row['task']:<7} {row['mu']:>6} {row['step_ms']:>9.1f} "
                f"{row['step_ratio']:>7.3f} {row['flops_ratio']:>10.4f} "
                f"{int(row['memory_bytes']) / 2**20:>10.2f} {row['memory_ratio']:>7.3f} "
                f"{int(row['activation_bytes']) / 2**20:>9.2f} {row['params']:>9}"
            )
        return "\n".join(lines)


def _profile(widths: Sequence[Width], directory: Path) -> None:
    """Writes torch.profiler's tables of a few steps of every width: per operator, then per
    operator and input shapes (which layer a convolution or matmul belongs to)."""
    directory.mkdir(parents=True, exist_ok=True)
    for width in widths:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            for _ in range(PROFILED_STEPS):
                width.step()
        tables = [
            profiler.key_averages(group_by_input_shape=by_shape).table(
                sort_by="self_cpu_time_total", row_limit=30)
            for by_shape in (False, True)
        ]
        (directory / f"{width.task}-mu{width.mu}.txt").write_text(
            f"{width.task} mu {width.mu}: {PROFILED_STEPS} steps\n" + "\n".join(tables))


def run_compute(
    tasks: Sequence[str], mus: Sequence[float], steps: int, threads: int = 1,
    profile_dir: Path | None = None,
) -> ComputeResult:
    torch.set_num_threads(threads)
    results: list[WidthResult] = []
    for task in tasks:
        widths = task_widths(task, mus, WARMUP_STEPS + steps)
        # The first step of each width is its memory measurement and part of its warm-up.
        memory = [measure_step(w.step, w.module, w.optimizer) for w in widths]
        for _ in range(WARMUP_STEPS - 1):
            for width in widths:
                width.step()
        for _ in range(steps):
            for width in widths:
                width.timed_step()
        if profile_dir is not None:
            _profile(widths, profile_dir)
        results.extend(
            WidthResult(task, w.mu, statistics.median(w.seconds), len(w.seconds),
                        parameter_count(w.module),
                        forward_flops_per_sample(w.spec, w.units), m)
            for w, m in zip(widths, memory, strict=True)
        )
    return ComputeResult(threads, os.getloadavg(), tuple(results))


# ---- command line ------------------------------------------------------------------------------


def _mus(text: str) -> tuple[float, ...]:
    try:
        return parse_mu(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_compute_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `compute` (under `peerd bench`); its `func` runs the benchmark."""
    compute = subparsers.add_parser(
        "compute", help="training step time and memory of sub-models against the full model",
        description="Train the task models' sub-models at each mu and the full model (mu 1) "
                    "on real data, steps interleaved; report the median step time, forward "
                    "FLOPs and the step's memory, each as a ratio to the full model.",
    )
    compute.add_argument("--task", choices=[*TASK_NAMES, "all"], default="all",
                         help="which task model (default: %(default)s)")
    compute.add_argument("--mu", type=_mus, default=DEFAULT_MUS, metavar="F[,F...]",
                         help="width ratios besides 1 (default: "
                              + ",".join(map(str, DEFAULT_MUS)) + ")")
    compute.add_argument("--steps", type=positive_int, default=20,
                         help="timed steps per width; the median is reported "
                              "(default: %(default)s)")
    compute.add_argument("--threads", type=positive_int, default=1,
                         help="torch threads (default: %(default)s)")
    compute.add_argument("--json", action="store_true", help="print one JSON object")
    compute.add_argument("--profile", type=Path, default=None, metavar="DIR",
                         help="write torch.profiler's operator table of every width to DIR")
    compute.set_defaults(func=run_compute_command)


def run_compute_command(args: argparse.Namespace) -> int:
    tasks = TASK_NAMES if args.task == "all" else (args.task,)
    return print_result(
        "compute", lambda: run_compute(tasks, args.mu, args.steps, args.threads, args.profile),
        args.json)

