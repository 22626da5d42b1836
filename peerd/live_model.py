"""`peerd export --addr HOST:PORT`: the global model of a running cluster, pulled from the
members one daemon knows and assembled here as the cluster watcher does (peerd/cluster.py).

The operator brings the cluster's configuration (its config file, PEERD_* variables or flags:
the task and the options every member agrees on) and a certificate from the cluster CA (a
`reader` is enough: Status and Pull). The daemon at the address must announce the fingerprint
that configuration gives, so a daemon of another task or cluster is named and refused before
anything is pulled. Plans are computed here from the members and their capacities, never taken
from the wire; the round assembled is the latest every member of the view has finished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from peerd.agreement import agreed_settings, cluster_fingerprint, fingerprint_mismatch
from peerd.algorithm.aggregate import Assembly
from peerd.algorithm.batchnorm import calibration_inputs
from peerd.algorithm.evaluate import evaluate
from peerd.algorithm.plan import planner_for
from peerd.algorithm.submodel import Params, init_params
from peerd.config import DaemonConfig
from peerd.global_model import ExportedModel, ExportError, write_model_file
from peerd.metrics import assembled_model, global_test_set
from peerd.models.base import ModelSpec, Plan, fingerprint
from peerd.net import PROTOCOL_VERSION
from peerd.net.client import PeerClients
from peerd.net.codec import Expectation, WireError
from peerd.net.tls import TlsIdentity
from peerd.tasks import get_task
from peerd.v1 import peer_pb2
from peerd.web.facts import MemberFacts, reply_members

# Who asks, without TLS (with it, the certificate's name: a daemon refuses any other claim).
INSECURE_REQUESTER = "peerd-export"


class PullError(RuntimeError):
    """A member did not hand over its parameters; the message names it and what gRPC said."""


@dataclass(frozen=True)
class MemberPull:
    """Where one member's parameters are pulled from, and the request that asks for them."""

    peer_id: str
    address: str
    request: peer_pb2.PullRequest


class Accumulator(Protocol):
    """What members' parameters are added to: `Assembly`, `metrics.GlobalEvaluation`."""

    def add(self, params: Params, plan: Plan) -> None: ...


async def pull_into(target: Accumulator, clients: PeerClients, pulls: Sequence[MemberPull],
                    expectation: Expectation, plans: Mapping[str, Plan]) -> None:
    """Pull the members' parameters one member at a time, each added to `target` with its
    plan before the next is pulled: besides `target`'s sums, one member's parameters in memory
    (`peerd export --addr` and the cluster watcher)."""
    for pull in pulls:
        try:
            stream = await clients.pull(pull.address, pull.peer_id, pull.request, expectation)
        except grpc.aio.AioRpcError as error:
            raise PullError(f"member {pull.peer_id} at {pull.address}: {error.code().name}: "
                            f"{error.details()}") from None
        target.add(stream.tensors, plans[pull.peer_id])
        del stream  # before the next member's arrives


@dataclass(frozen=True)
class Reached:
    """What `address` answered: its cluster, the view it runs and the round its members all
    finished."""

    cluster: str
    members: list[MemberFacts]
    rounds: int


def export_live_model(address: str, config: DaemonConfig, tls: TlsIdentity | None,
                      destination: Path) -> ExportedModel:
    """Pull the members' parameters after their latest common round, assemble the full model,
    score it on the task's held-out set and write its state_dict to `destination`."""
    task = get_task(config.task)
    data = task.load_data(config.data_dir, label_column=config.label_column)
    spec = task.model(data, config.early_exits)
    expected = cluster_fingerprint(fingerprint(spec), agreed_settings(config))
    try:
        reached, assembly = asyncio.run(_pull(address, config, tls, spec, expected))
    except grpc.aio.AioRpcError as error:
        raise ExportError(f"{address}: {error.code().name}: {error.details()}") from None
    except WireError as error:
        raise ExportError(f"{address}: {error.code.name}: {error.detail}") from None
    except PullError as error:
        raise ExportError(str(error)) from None
    model = assembled_model(spec, calibration_inputs(data.train.inputs), assembly.result())
    global_acc = evaluate(model, spec.kind, global_test_set(data, task.eval_samples)).accuracy
    write_model_file(destination, model, config.task, reached.rounds, global_acc)
    state = model.state_dict()
    return ExportedModel(destination, config.task, reached.rounds, global_acc, len(state),
                         sum(tensor.numel() for tensor in state.values()))


async def _pull(address: str, config: DaemonConfig, tls: TlsIdentity | None, spec: ModelSpec,
                expected: str) -> tuple[Reached, Assembly]:
    """The members' parameters after their latest common round, added to the assembly one
    member at a time: besides the assembly's sums, one member's parameters in memory."""
    shapes = {name: (tensor.dtype, tuple(tensor.shape))
              for name, tensor in init_params(spec, config.seed).items()}
    clients = PeerClients(tls)
    try:
        reached = await _reach(clients, address, expected, config)
        # Plans are a pure function: computed here, never taken from the wire.
        plans = planner_for(config, spec).plan(
            reached.rounds - 1, [fact.member(spec.groups) for fact in reached.members],
            spec.groups)
        expectation = Expectation(PROTOCOL_VERSION, reached.cluster, expected,
                                  lambda header: shapes)
        request = peer_pb2.PullRequest(
            protocol_version=PROTOCOL_VERSION, cluster=reached.cluster,
            model_fingerprint=expected,
            requester=tls.name if tls is not None else INSECURE_REQUESTER, round=reached.rounds)
        assembly = Assembly(spec)
        await pull_into(assembly, clients,
                        [MemberPull(member.peer_id, member.address, request)
                         for member in reached.members], expectation, plans)
        return reached, assembly
    finally:
        await clients.close()


async def _reach(clients: PeerClients, address: str, expected: str,
                 config: DaemonConfig) -> Reached:
    """The view of the daemon at `address`, checked against `expected`, and the latest round
    every member of it has finished (as each member reports itself)."""
    reply = await clients.status(address)
    me = reply.self
    if me.model_fingerprint != expected:
        raise ExportError(f"{address} ({me.peer_id}) runs another cluster than the task "
                          f"{config.task!r} and options given here: "
                          f"{fingerprint_mismatch(me.model_fingerprint, expected)}")
    if not me.members:
        raise ExportError(f"{address} ({me.peer_id}) has no committed view yet: try again once "
                          f"its cluster has started")
    known = {fact.peer_id: fact for fact in reply_members(reply, time.time())}
    unknown = [peer_id for peer_id in me.members if peer_id not in known]
    if unknown:
        raise ExportError(f"{address} ({me.peer_id}) has no address for members "
                          f"{', '.join(unknown)}")
    members = [known[peer_id] for peer_id in me.members]
    own = await asyncio.gather(*(clients.status(m.address, m.peer_id) for m in members))
    rounds = min(status.self.round for status in own)
    if rounds == 0:
        raise ExportError(f"the cluster of {address} has not finished a round yet")
    if me.view_round > rounds - 1:
        raise ExportError(f"the view of {address} began at round {me.view_round + 1}, after "
                          f"round {rounds}, the last every member finished: try again after "
                          f"its next round")
    return Reached(me.cluster, members, rounds)
