"""A daemon's checkpoints: one after every round (the driver's checkpoint step), resumed from at
start, and the final parameters at stop. The file format is peerd/state.py's."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from peerd.algorithm.plan import Member
from peerd.algorithm.submodel import Params, copy_into
from peerd.state import Checkpoint, load_checkpoint, rewind, save_checkpoint, save_parameters

if TYPE_CHECKING:
    from peerd.algorithm.driver import RoundDriver

log = logging.getLogger("peerd.checkpoints")


def view_entry(member: Member) -> list:
    """A member as checkpoints record it: [peer id, mu], with its depth where set, and
    [peer id, mu, depth or null, [[group, units], ...]] with learned widths."""
    if member.widths is not None:
        return [member.peer_id, member.mu, member.depth, [list(w) for w in member.widths]]
    return [member.peer_id, member.mu] + ([] if member.depth is None else [member.depth])


def entry_member(entry: list) -> Member:
    """The inverse of view_entry."""
    if len(entry) == 4:
        peer_id, mu, depth, widths = entry
        return Member(peer_id, mu, depth, tuple((name, units) for name, units in widths))
    return Member(*entry)


class Checkpoints:
    def __init__(self, state_dir: Path, identity: dict, cluster: str, kept: int) -> None:
        """`identity`: what a checkpoint must match to be resumed from (anything else is
        another run); `kept`: how many are kept (0: none written)."""
        self.state_dir = state_dir
        self.identity = identity
        self.cluster = cluster
        self.kept = kept
        self._written = False

    def save(self, rounds: int, params: Params, meta: dict) -> float:
        """Worker: write the checkpoint after `rounds` rounds; returns its seconds."""
        started = time.perf_counter()
        size = save_checkpoint(self.state_dir, rounds, params,
                               {**self.identity, "cluster": self.cluster, **meta}, self.kept)
        elapsed = time.perf_counter() - started
        # The first one at INFO: what a checkpoint costs on this board, once per start.
        log.log(logging.DEBUG if self._written else logging.INFO,
                "checkpoint after round %d: %d bytes in %.1f ms", rounds, size, elapsed * 1000)
        self._written = True
        return elapsed

    def load(self, params: Params, near_round: int | None) -> Checkpoint | None:
        shapes = {name: tuple(tensor.shape) for name, tensor in params.items()}
        return load_checkpoint(self.state_dir, shapes, self.identity, near_round)

    def save_final(self, params: Params, rounds_done: int, members: tuple[Member, ...]) -> None:
        save_parameters(self.state_dir, params, {
            **self.identity, "rounds_done": rounds_done,
            "view": [view_entry(m) for m in members]})


def resume(driver: RoundDriver, checkpoint: Checkpoint) -> None:
    """Take a checkpoint's counters (its parameters: copy_into); its round is where this
    peer asks to start (the first view starts at the lowest such round among its members).
    On the event loop, or before it runs."""
    record = checkpoint.record
    driver.round_index = checkpoint.round
    driver.rounds_done = record["rounds_done"]
    driver.bytes_sent, driver.bytes_received = record["bytes_sent"], record["bytes_received"]
    driver.last_loss = record["train_loss"]
    # Peers may pull these parameters (a joiner's start) before this peer finishes a round.
    members = tuple(entry_member(entry) for entry in record["view"])
    if any(m.peer_id == driver.peer_id for m in members):
        engine = driver.engine
        plan = engine.planner.plan(checkpoint.round - 1, members, engine.spec.groups)
        driver.keep_snapshot(checkpoint.round,
                             driver.take_snapshot(checkpoint.params, plan[driver.peer_id]))


def checkpoint_to_enter(checkpoints: Checkpoints, params: Params, first_round: int,
                        resumed_at: int) -> Checkpoint | None:
    """Worker: the first view starts at `first_round`; if that is not the round this peer's
    checkpoint is for, the checkpoint after `first_round` rounds (or the closest one) to take
    instead. Later checkpoints and records are dropped: those rounds run again."""
    checkpoint = None
    if first_round != resumed_at:
        checkpoint = checkpoints.load(params, first_round)
        if checkpoint is None:
            log.warning("no checkpoint here: round %d starts from the initial parameters",
                        first_round)
        elif checkpoint.round != first_round:
            log.warning("no sound checkpoint after round %d here: starting it from %s",
                        first_round, checkpoint.path)
    rewind(checkpoints.state_dir, first_round)
    return checkpoint


async def enter_at(driver: RoundDriver, checkpoints: Checkpoints, first_round: int) -> None:
    """The first view starts at `first_round`: take the checkpoint for it where this peer's
    own is for another round (see checkpoint_to_enter), and start there."""
    params = driver.engine.params
    checkpoint = await driver.offload(checkpoint_to_enter, checkpoints, params, first_round,
                                      driver.round_index)
    if checkpoint is not None:
        await driver.offload(copy_into, params, checkpoint.params)
        resume(driver, checkpoint)
    driver.round_index = first_round
