"""One peer's round as pure steps: plan -> train -> outbox -> merge.

The engine knows nothing of networks: the simulator and the daemon both feed it members,
carry its outgoing slices and hand it what arrived. Everything it does is a deterministic
function of its parameters, its data, the seed and the round.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from peerd.algorithm.aggregate import Arrival, exchange_count, merge, outbox, staleness_weight
from peerd.algorithm.evaluate import Evaluation, evaluate
from peerd.algorithm.losses import BalancedSoftmax, ModelContrastive, early_exit_loss, task_loss
from peerd.algorithm.numerics import all_finite
from peerd.algorithm.plan import Member, Planner, Plans
from peerd.algorithm.submodel import (
    Params,
    extract,
    forward_flops_per_sample,
    freeze_shallowest,
    write_back,
)
from peerd.algorithm.topology import Topology
from peerd.algorithm.transport import SliceMessage
from peerd.config import TrainConfig
from peerd.data import Split
from peerd.models.base import ModelSpec, Plan, plan_depth, plan_units, same_plan

log = logging.getLogger("peerd.algorithm.engine")

# Forward plus backward costs about three forward passes (backward ~ 2x forward).
TRAIN_FLOPS_PER_FORWARD = 3


def sgd(module: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """The optimizer of a round's local training: fresh state every round, none for frozen
    parameters."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def model_loss(kind: str, config: TrainConfig, module: nn.Module, inputs: torch.Tensor,
               targets: torch.Tensor, frozen_blocks: int = 0) -> torch.Tensor:
    """The task loss of the model's output, or with early exits the loss over every exit past
    the frozen blocks (a frozen exit has nothing left to train)."""
    if not config.early_exits:
        return task_loss(kind, module(inputs), targets)
    exits = module.forward_exits(inputs)[frozen_blocks:]
    return early_exit_loss(kind, exits, targets, config.distill_temperature)


# A training objective other than the model loss: (module, inputs, targets) -> loss.
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train_step(
    kind: str, config: TrainConfig, module: nn.Module, optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor, targets: torch.Tensor, frozen_blocks: int = 0,
    objective: Objective | None = None,
) -> float:
    """One SGD step of local training; the batch's loss."""
    if objective is None:
        loss = model_loss(kind, config, module, inputs, targets, frozen_blocks)
    else:
        loss = objective(module, inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
    optimizer.step()
    return loss.item()


@dataclass(frozen=True)
class RoundContext:
    round_index: int
    members: tuple[Member, ...]
    plans_now: Plans
    plans_next: Plans
    neighbours: tuple[str, ...]


@dataclass(frozen=True)
class LateSlice:
    """A neighbour's slice of an earlier round, with this peer's context of that round (its
    plans fixed the slice's entries)."""

    ctx: RoundContext
    message: SliceMessage


@dataclass(frozen=True)
class Staleness:
    """How late slices count: weight factor (1 + s)^-exponent, none older than max_rounds."""

    exponent: float = 0.5
    max_rounds: int = 4


@dataclass(frozen=True)
class TrainStats:
    loss: float
    samples: int
    steps: int
    forward_flops_per_sample: int
    frozen_forwards: int = 0  # extra no-grad forwards per sample (the contrastive term's)

    @property
    def train_flops(self) -> int:
        forwards = TRAIN_FLOPS_PER_FORWARD + self.frozen_forwards
        return forwards * self.forward_flops_per_sample * self.samples


class Engine:
    def __init__(
        self, peer_id: str, spec: ModelSpec, params: Params, train_split: Split,
        test_split: Split, planner: Planner, topology: Topology, train: TrainConfig, seed: int,
        wire_dtype: str = "float32", staleness: Staleness | None = None, frozen_blocks: int = 0,
    ) -> None:
        self.peer_id = peer_id
        self.spec = spec
        self.params = params
        self.train_split = train_split
        self.test_split = test_split
        planner.check_groups(spec.groups)  # a bad group name fails at build, not in a round
        self.planner = planner
        self.topology = topology
        self.train_config = train
        self.seed = seed
        # Values travel in this precision and are merged back in the parameters' own.
        self.wire_dtype: torch.dtype = getattr(torch, wire_dtype)
        self.staleness = staleness if staleness is not None else Staleness()
        # The shallowest kept blocks this peer does not train (short of memory); see
        # freeze_shallowest.
        self.frozen_blocks = frozen_blocks
        # The contrastive term only: the sub-model right after the last round's training, cut
        # to the plan this peer then expected for the next round. Slice-sized, not a full copy
        # (invariant 9).
        self.after_training: tuple[Plan, nn.Module] | None = None
        # Called with (steps done, steps this round) after every local step: progress display.
        self.on_step: Callable[[int, int], None] | None = None
        # A task's own loss (peerd.Task.loss), trained instead of the model loss.
        self.task_objective: Objective | None = None

    @property
    def weight(self) -> float:
        return float(len(self.train_split))

    def begin_round(self, round_index: int, members: Sequence[Member]) -> RoundContext:
        ordered = tuple(sorted(members, key=lambda member: member.peer_id))
        groups = self.spec.groups
        return RoundContext(
            round_index=round_index,
            members=ordered,
            plans_now=self.planner.plan(round_index, ordered, groups),
            plans_next=self.planner.plan(round_index + 1, ordered, groups),
            neighbours=self.topology.neighbours([m.peer_id for m in ordered], self.peer_id),
        )

    def own_plan(self, ctx: RoundContext) -> Plan:
        return ctx.plans_now[self.peer_id]

    def _seed_global_generator(self, round_index: int) -> None:
        """Dropout, and any other draw from torch's global generator during local training,
        seeded by (seed, round, peer): the same in the simulator and in a daemon, whatever the
        process drew before."""
        keys = [self.seed, round_index, zlib.crc32(self.peer_id.encode()), 1]
        torch.manual_seed(int(np.random.default_rng(keys).integers(2**62)))

    def _batch_order(self, round_index: int) -> torch.Tensor:
        keys = [self.seed, round_index, zlib.crc32(self.peer_id.encode())]
        generator = torch.Generator().manual_seed(int(np.random.default_rng(keys).integers(2**62)))
        return torch.randperm(len(self.train_split), generator=generator)

    def train(self, ctx: RoundContext) -> TrainStats:
        """Extract this round's sub-model, train it locally, write it back."""
        plan = self.own_plan(ctx)
        module, stats = self.train_submodel(ctx, lambda: extract(self.spec, self.params, plan))
        write_back(self.spec, self.params, plan, module)
        if self.train_config.contrastive:
            next_plan = ctx.plans_next[self.peer_id]
            self.after_training = (next_plan, extract(self.spec, self.params, next_plan))
        return stats

    def train_submodel(self, ctx: RoundContext,
                       build: Callable[[], nn.Module]) -> tuple[nn.Module, TrainStats]:
        """Train this round's sub-model, which `build` makes once the round's generator is
        seeded (building a module draws from it); the trained module and its stats."""
        plan = self.own_plan(ctx)
        config = self.train_config
        self._seed_global_generator(ctx.round_index)
        module = build()
        module.train()
        if self.frozen_blocks:
            depth = plan_depth(plan)
            if depth is None or not self.frozen_blocks < depth:
                raise ValueError(f"{self.frozen_blocks} frozen blocks need a model with early "
                                 f"exits and more kept blocks (depth {depth})")
            freeze_shallowest(self.spec, module, self.frozen_blocks)
        optimizer = sgd(module, config)
        objective = self._contrastive_objective(plan) or self.task_objective
        if config.balanced_softmax:  # issue 23: the local label prior taken out of the logits
            objective = BalancedSoftmax(self.spec.kind, self.train_split.targets)
        loss_sum, samples, steps = 0.0, 0, 0
        total_steps = self.round_steps()
        for epoch in range(config.local_epochs):
            order = self._batch_order(ctx.round_index * config.local_epochs + epoch)
            for start in range(0, len(order), config.batch_size):
                if config.max_local_steps is not None and steps >= config.max_local_steps:
                    break
                batch = order[start:start + config.batch_size]
                loss = train_step(self.spec.kind, config, module, optimizer,
                                  self.train_split.inputs[batch], self.train_split.targets[batch],
                                  self.frozen_blocks, objective)
                loss_sum += loss * len(batch)
                samples += len(batch)
                steps += 1
                if self.on_step is not None:
                    self.on_step(steps, total_steps)
        return module, TrainStats(
            loss=loss_sum / max(samples, 1), samples=samples, steps=steps,
            forward_flops_per_sample=forward_flops_per_sample(self.spec, plan_units(plan)),
            frozen_forwards=0 if objective is None else objective.frozen_forwards,
        )

    def round_steps(self) -> int:
        """Local steps a round takes: every batch of every local epoch, up to the cap."""
        config = self.train_config
        steps = config.local_epochs * math.ceil(len(self.train_split) / config.batch_size)
        return steps if config.max_local_steps is None else min(steps, config.max_local_steps)

    def _contrastive_objective(self, plan: Plan) -> ModelContrastive | None:
        """The contrastive term's objective: this round's plan cut from the post-aggregation
        parameters and from those right after the last round's training. None when it is off,
        in a peer's first round (no previous local model yet), and when the members changed
        since (the plan differs from the one the previous local model was cut to)."""
        config = self.train_config
        if not config.contrastive or self.after_training is None:
            return None
        expected, previous = self.after_training
        if not same_plan(expected, plan):
            log.info("%s: the members changed; no contrastive term this round", self.peer_id)
            return None
        return ModelContrastive(
            self.spec.kind, extract(self.spec, self.params, plan), previous,
            config.contrastive_weight, config.contrastive_tau,
        )

    def outbox(self, ctx: RoundContext) -> list[SliceMessage]:
        """One message per neighbour with the entries it holds now or will hold next round."""
        return [
            SliceMessage(
                sender=self.peer_id, receiver=neighbour, round_index=ctx.round_index,
                weight=self.weight,
                values={name: values.to(self.wire_dtype) for name, values in outbox(
                    self.spec, self.params, self.own_plan(ctx), ctx.plans_now[neighbour],
                    ctx.plans_next[neighbour]).items()},
            )
            for neighbour in ctx.neighbours
        ]

    def expected_counts(self, ctx: RoundContext, sender: str) -> dict[str, int]:
        """How many values of each parameter `sender` sends this peer in this round."""
        return {
            name: exchange_count(self.spec, name, tensor.shape, ctx.plans_now[sender],
                                 self.own_plan(ctx), ctx.plans_next[self.peer_id])
            for name, tensor in self.params.items()
        }

    def check_message(self, ctx: RoundContext, message: SliceMessage,
                      expected_counts: dict[str, int] | None = None) -> None:
        """Refuse a message that does not fit this round's plans, before anything is merged;
        `expected_counts` saves computing the sender's counts again."""
        if message.receiver != self.peer_id or message.round_index != ctx.round_index:
            raise ValueError(
                f"message from {message.sender} is for {message.receiver} round "
                f"{message.round_index}, not {self.peer_id} round {ctx.round_index}"
            )
        if message.sender not in ctx.neighbours:
            raise ValueError(f"{message.sender} is not a neighbour of {self.peer_id}")
        if set(message.values) != set(self.params):
            raise ValueError(f"message from {message.sender}: wrong parameter names")
        if expected_counts is None:
            expected_counts = self.expected_counts(ctx, message.sender)
        for name, values in message.values.items():
            expected = expected_counts[name]
            if values.dtype != self.wire_dtype:
                raise ValueError(
                    f"message from {message.sender}: {name} is {values.dtype}, the cluster "
                    f"exchanges {self.wire_dtype}"
                )
            if values.dim() != 1 or values.numel() != expected:
                raise ValueError(
                    f"message from {message.sender}: {name} has {values.numel()} values, "
                    f"the plans say {expected}"
                )
            if not all_finite(values):
                raise ValueError(f"message from {message.sender}: {name} has non-finite values")

    def merge(self, ctx: RoundContext, messages: Sequence[SliceMessage],
              late: Sequence[LateSlice] = ()) -> list[int]:
        """Merge this round's slices and, with their staleness weight, late slices of earlier
        rounds; a late slice older than `staleness.max_rounds` is left out (as if it had never
        arrived). Every message is checked against the plans of its own round before anything
        is merged. Returns the staleness of each late slice merged."""
        for message in messages:
            self.check_message(ctx, message)
        for stale in self._usable(ctx, late):
            self.check_message(stale.ctx, stale.message)
        return self.merge_checked(ctx, messages, late)

    def _usable(self, ctx: RoundContext, late: Sequence[LateSlice]) -> list[LateSlice]:
        return [s for s in late
                if 1 <= ctx.round_index - s.ctx.round_index <= self.staleness.max_rounds]

    def merge_checked(self, ctx: RoundContext, messages: Sequence[SliceMessage],
                      late: Sequence[LateSlice] = ()) -> list[int]:
        """`merge` of messages already checked against their round's plans (the round driver
        checks each slice once, when it arrives)."""
        usable = self._usable(ctx, late)
        arrivals = [
            Arrival(ctx.plans_now[m.sender], m.weight, m.values)
            for m in sorted(messages, key=lambda m: m.sender)
        ]
        for stale in sorted(usable, key=lambda s: (s.ctx.round_index, s.message.sender)):
            staleness = ctx.round_index - stale.ctx.round_index
            arrivals.append(Arrival(
                stale.ctx.plans_now[stale.message.sender],
                stale.message.weight * staleness_weight(staleness, self.staleness.exponent),
                stale.message.values,
                (stale.ctx.plans_now[self.peer_id], stale.ctx.plans_next[self.peer_id]),
            ))
        merge(self.spec, self.params, self.own_plan(ctx), ctx.plans_next[self.peer_id],
              self.weight, arrivals)
        return [ctx.round_index - s.ctx.round_index for s in usable]

    def evaluate_local(self, ctx: RoundContext) -> Evaluation:
        """This peer's sub-model for the round on its own test split."""
        module = extract(self.spec, self.params, self.own_plan(ctx))
        return evaluate(module, self.spec.kind, self.test_split)
