"""What this device can afford: the width ratio (`--mu auto`) chosen from measurements.

At start a daemon with `--mu auto` trains a few steps of its own sub-model at each candidate
width on its own data and measures, per width, the step time and the memory the step holds
(parameters, gradients, momentum, and the activations autograd saves). It then takes the
widest candidate whose training fits the memory budget and, if a round target is set, whose
local training fits the target.

The memory budget covers the whole daemon process:
    peak = resident now (runtime, data, the one full copy of the parameters)
         + `held_bytes(slice bytes at the candidate width)`: round snapshots served to pulls,
           the outgoing and incoming slices (slice-sized, invariant 9)
         + RUNTIME_MARGIN_BYTES (see there)
         + the training step at the chosen width.
The budget is a hard limit (no width fits: an error naming both figures); the round target is
a soft one (no width fits: the narrowest, with a warning).

A model with early exits can also save memory in depth (Co-S2P): freeze the shallowest kept
blocks (no gradients, optimizer state or saved activations below the first trained block) or
keep fewer blocks. The probe then measures, at every width, each shape in this order of
preference, and the first that fits wins:
    all D blocks trained; all D kept with 1, 2, .., D-1 frozen; D-1, D-2, .., 1 kept, none frozen
then the same at the next narrower width. Width is given up last because a narrower window
covers fewer entries of every layer and MSfusion's coverage relies on the windows adding up;
freezing comes before dropping blocks because a frozen block still takes its neighbours' values
and serves them, and the peer keeps its deepest exit, which is the model's output.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peerd.algorithm.engine import sgd, train_step
from peerd.algorithm.plan import Member, MSFusionPlanner, Planner
from peerd.algorithm.submodel import Params, extract, freeze_shallowest, slice_numel
from peerd.allocator import release_freed_memory
from peerd.config import TrainConfig
from peerd.data import Split
from peerd.memlimit import own_headroom_bytes
from peerd.models.base import DEPTH, ModelSpec, Plan

log = logging.getLogger(__name__)

# Widest first; MSfusion never lets a peer train more than half of any layer.
MU_CHOICES = (0.5, 0.25, 0.125, 0.0625)
PROBE_STEPS = 3  # timed, after one step that is also the memory measurement
# What a daemon allocates after the probe and the parts above do not count: gRPC, TLS and mDNS,
# the threads and their malloc arenas, evaluation, checkpoint serialisation, the step's
# transient buffers. Measured: the peak exceeded the other parts by 98 MiB (digits) and 78 MiB
# (fmnist) on x86-64 (tests/test_mixed_capacity.py checks the whole estimate).
RUNTIME_MARGIN_BYTES = 128 * 2**20


class CapacityError(ValueError):
    """The device cannot train any width within its budget, or cannot tell its memory."""


def _meminfo_bytes(path: Path, key: str) -> int | None:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024  # reported in kB
    return None


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo"),
                           cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """What this process may still allocate: the kernel's MemAvailable, or less if the cgroup
    it runs in (a systemd MemoryMax=, a container) allows less."""
    available = _meminfo_bytes(meminfo, "MemAvailable")
    if available is None:
        raise CapacityError(f"{meminfo} has no MemAvailable: give --memory-budget")
    limit_file, usage_file = cgroup / "memory.max", cgroup / "memory.current"
    if limit_file.exists() and usage_file.exists():
        limit = limit_file.read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(usage_file.read_text()))
    headroom = own_headroom_bytes()  # a cgroup v1 memory group (`peerd cluster --memory-limit`)
    if headroom is not None:
        available = min(available, headroom)
    return available


def resident_bytes(status: Path = Path("/proc/self/status")) -> int:
    """This process's resident set now (VmRSS)."""
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise CapacityError(f"{status} has no VmRSS")


# ---- one training step, measured -------------------------------------------------------------


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step holds, by what holds them."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # saved for backward during the forward pass

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the memory a tensor keeps alive: a view keeps its whole storage."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


@contextmanager
def _saved_bytes(module: nn.Module) -> Iterator[dict[int, int]]:
    """Yields storage address -> bytes of every tensor autograd saves inside the block."""
    own = {_storage(p)[0] for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        address, size = _storage(tensor)
        if address not in own:
            saved[address] = size
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def measure_step(
    step: Callable[[], object], module: nn.Module, optimizer: torch.optim.Optimizer
) -> StepMemory:
    """Runs one training step and reports what it held: parameters, the gradients and optimizer
    state it leaves behind, and what its forward pass saved for backward."""
    with _saved_bytes(module) as saved:
        step()
    parameters = list(module.parameters())
    return StepMemory(
        param_bytes=_tensor_bytes(parameters),
        grad_bytes=_tensor_bytes(p.grad for p in parameters if p.grad is not None),
        optimizer_bytes=_tensor_bytes(
            value for state in optimizer.state.values() for value in state.values()
            if isinstance(value, torch.Tensor)
        ),
        activation_bytes=sum(saved.values()),
    )


# ---- probing and choosing ----------------------------------------------------------------------


@dataclass(frozen=True)
class WidthProbe:
    mu: float
    step_s: float  # median of the timed steps
    memory: StepMemory
    depth: int | None = None  # blocks kept (models with early exits); None: all
    frozen: int = 0  # shallowest kept blocks not trained
    # Median CPU seconds of the timed steps: unlike step_s, not inflated by other processes.
    step_cpu_s: float = math.nan
    held_bytes: int = 0  # the slices a daemon keeps besides training, at this shape

    @property
    def total_bytes(self) -> int:
        """What this shape adds to the fixed part: its training step and its held slices."""
        return self.memory.total_bytes + self.held_bytes


def depth_shapes(blocks: int) -> list[tuple[int, int]]:
    """(depth, frozen) shapes of a model with `blocks` blocks, in order of preference."""
    frozen = [(blocks, count) for count in range(blocks)]
    return frozen + [(depth, 0) for depth in range(blocks - 1, 0, -1)]


def _probe_plan(spec: ModelSpec, mu: float, depth: int | None,
                planner: Planner | None) -> Plan:
    """The sub-model `planner` gives one member (default msfusion's: the daemon's own planner
    counts the groups it keeps whole)."""
    planner = planner if planner is not None else MSFusionPlanner(seed=0)
    return planner.plan(0, [Member("probe", mu, depth)], spec.groups)["probe"]


def floor_bytes(spec: ModelSpec, params: Params, mu: float, depth: int | None = None,
                held_bytes: Callable[[int], int] | None = None,
                planner: Planner | None = None) -> int:
    """What a shape holds before its first step, counted without building it: its parameters
    and the slices a daemon keeps at that width. A lower bound of the probe's own peak (no
    gradients, optimizer state or activations yet)."""
    plan = _probe_plan(spec, mu, depth, planner)
    slice_bytes = 4 * sum(slice_numel(spec, params, plan).values())
    return slice_bytes + (0 if held_bytes is None else held_bytes(slice_bytes))


def probe_width(spec: ModelSpec, params: Params, split: Split, config: TrainConfig,
                mu: float, steps: int = PROBE_STEPS, depth: int | None = None,
                frozen: int = 0, held_bytes: Callable[[int], int] | None = None,
                planner: Planner | None = None) -> WidthProbe:
    """Train `steps` + 1 steps of the sub-model of width mu, keeping `depth` blocks with
    `frozen` of them frozen (extracted: a copy, the daemon's parameters stay untouched): the
    first step is measured for memory, the rest are timed. The sub-model is `planner`'s
    (_probe_plan)."""
    plan = _probe_plan(spec, mu, depth, planner)
    module = extract(spec, params, plan)
    module.train()
    freeze_shallowest(spec, module, frozen)
    optimizer = sgd(module, config)
    size = min(config.batch_size, len(split))
    batches = [(split.inputs[i * size:(i + 1) * size], split.targets[i * size:(i + 1) * size])
               for i in range(max(1, len(split) // size))]

    def step(index: int) -> None:
        inputs, targets = batches[index % len(batches)]
        train_step(spec.kind, config, module, optimizer, inputs, targets, frozen)

    memory = measure_step(lambda: step(0), module, optimizer)
    seconds, cpu_seconds = [], []
    for index in range(1, steps + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        step(index)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    slice_bytes = 4 * sum(slice_numel(spec, params, plan).values())
    held = 0 if held_bytes is None else held_bytes(slice_bytes)
    return WidthProbe(mu, statistics.median(seconds), memory, depth, frozen,
                      statistics.median(cpu_seconds), held)


def steps_per_round(samples: int, config: TrainConfig) -> int:
    """How many SGD steps `Engine.train` takes in a round on `samples` samples."""
    steps = math.ceil(samples / config.batch_size) * config.local_epochs
    return steps if config.max_local_steps is None else min(steps, config.max_local_steps)


@dataclass(frozen=True)
class CapacityChoice:
    mu: float
    budget_bytes: int
    fixed_bytes: int  # everything but the training step
    round_s: float  # estimated local training per round at mu
    probes: tuple[WidthProbe, ...]
    depth: int | None = None  # blocks kept; None: all
    frozen: int = 0

    def describe(self) -> str:
        chosen = next(p for p in self.probes
                      if (p.mu, p.depth, p.frozen) == (self.mu, self.depth, self.frozen))
        shape = "" if self.depth is None else f", depth {self.depth}, {self.frozen} frozen"
        total_mib = (self.fixed_bytes + chosen.total_bytes) / 2**20
        return (f"mu {self.mu}{shape}: about {total_mib:.0f}"
                f" MiB of a {self.budget_bytes / 2**20:.0f} MiB budget (training step "
                f"{chosen.memory.total_bytes / 2**20:.1f} MiB), about {self.round_s:.1f} s of "
                f"training a round")


def choose_mu(probes: Sequence[WidthProbe], fixed_bytes: int, budget_bytes: int,
              round_steps: int, round_target_s: float | None) -> CapacityChoice:
    """The widest probed width that fits the memory budget and, when given, the round target;
    at one width, the first fitting probe in the order given (see depth_shapes)."""
    ordered = sorted(probes, key=lambda p: p.mu, reverse=True)  # stable: keeps that order
    fitting = [p for p in ordered if fixed_bytes + p.total_bytes <= budget_bytes]
    if not fitting:
        narrowest = ordered[-1]
        raise CapacityError(
            f"memory budget {budget_bytes / 2**20:.0f} MiB is too small: even mu "
            f"{narrowest.mu} needs about "
            f"{(fixed_bytes + narrowest.total_bytes) / 2**20:.0f} MiB "
            f"({fixed_bytes / 2**20:.0f} MiB held besides training)")
    chosen = fitting[0]
    if round_target_s is not None:
        in_time = [p for p in fitting if p.step_s * round_steps <= round_target_s]
        if in_time:
            chosen = in_time[0]
        else:
            chosen = fitting[-1]
            log.warning("no width trains a round within %g s; mu %s takes about %.1f s",
                        round_target_s, chosen.mu, chosen.step_s * round_steps)
    return CapacityChoice(chosen.mu, budget_bytes, fixed_bytes, chosen.step_s * round_steps,
                          tuple(ordered), chosen.depth, chosen.frozen)


def measure_capacity(
    spec: ModelSpec, params: Params, split: Split, config: TrainConfig,
    budget_bytes: int | None, round_target_s: float | None,
    held_bytes: Callable[[int], int] | None = None, planner: Planner | None = None,
) -> CapacityChoice:
    """Probe every candidate width (and, with early exits, depth and frozen blocks) on this
    device and choose one (see the module's text). Without a budget, the memory the kernel
    reports available is the budget. The memory the probes free goes back to the kernel
    before and after them: resident now is then what the daemon holds, and the probes of wider
    widths leave nothing resident beside the round's training (BENCHMARKS.md, "mu auto under a
    kernel limit: what the probe left behind")."""
    release_freed_memory()
    resident = resident_bytes()
    fixed = resident + RUNTIME_MARGIN_BYTES
    budget = budget_bytes if budget_bytes is not None else resident + available_memory_bytes()
    shapes = depth_shapes(spec.groups[DEPTH].units) if DEPTH in spec.groups else [(None, 0)]
    # A shape whose parameters and held slices alone exceed the budget could never be chosen,
    # and training it to find out could be what the kernel kills the daemon for: not probed.
    # The narrowest width always is, so that a budget nothing fits names its figure.
    narrowest = min(MU_CHOICES)
    probes = [probe_width(spec, params, split, config, mu, depth=depth, frozen=frozen,
                          held_bytes=held_bytes, planner=planner)
              for mu in MU_CHOICES for depth, frozen in shapes
              if mu == narrowest
              or fixed + floor_bytes(spec, params, mu, depth, held_bytes, planner) <= budget]
    release_freed_memory()
    return choose_mu(probes, fixed, budget, steps_per_round(len(split), config), round_target_s)
