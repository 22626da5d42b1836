"""What a neighbour can make a daemon hold (issue 21, invariant 9): however many slices it
streams at once, for however many rounds, a real daemon holds at most one stream per round and
neighbour in its inbox window; twins are refused at the header, before any value is read, and
rounds outside the window are refused outright. The flood comes from outside, as a neighbour
would send it: a real gRPC client with the neighbour's own certificate, full-size slices that
match the plans, streams held open after their last byte."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import torch
from daemons import ClusterCa, kill_all, start_loopback_daemons, wait_all

from peerd.algorithm.aggregate import exchange_count
from peerd.algorithm.plan import Member, planner_for
from peerd.config import DaemonConfig
from peerd.net import PROTOCOL_VERSION
from peerd.net.client import PeerClients
from peerd.net.codec import encode_frames
from peerd.net.slices import plan_to_wire
from peerd.tasks import get_task
from peerd.v1 import peer_pb2

# Streams of one slice at once: without the bound, 14 slices held in memory. (Beyond 16 on one
# connection, HTTP/2 refuses streams before the daemon sees them: peerd/net/limits.py.)
TWINS = 14
TASK = f"{Path(__file__).parent / 'large_slices_task.py'}:task"  # 38 MB, trains in no time
MU = 1.0  # every entry held by both: a slice is the whole model
ROUNDS = 2
START_TIMEOUT_S = 60.0
FLOOD_WAIT_S = 8.0
RSS_MARGIN = 48 << 20  # what two daemons' peaks differ by in the same rounds, and more


def _slice(round_index: int, members: list[Member], sender: str, receiver: str
           ) -> tuple[list[peer_pb2.GroupUnits], dict[str, torch.Tensor]]:
    """The sender's units and a slice of the size the plans give it (values: zeros)."""
    config = DaemonConfig()
    task = get_task(TASK)
    spec = task.model(task.load_data(None))
    planner = planner_for(config, spec)
    now = planner.plan(round_index, members, spec.groups)
    following = planner.plan(round_index + 1, members, spec.groups)
    shapes = {name: p.shape for name, p in spec.build(
        {name: group.units for name, group in spec.groups.items()}).named_parameters()}
    values = {name: torch.zeros(exchange_count(spec, name, shape, now[sender], now[receiver],
                                               following[receiver]))
              for name, shape in shapes.items()}
    return plan_to_wire(now[sender]), values


async def _flood(address: str, clients: PeerClients, header: peer_pb2.StreamHeader,
                 values: dict[str, torch.Tensor], streams: int) -> tuple:
    """`streams` pushes of one slice at once, each held open after its last frame; returns
    the refusals (code, details), how many streams the daemon kept open, and what ends them
    (set the event, cancel the calls, await the futures)."""
    hold = asyncio.Event()

    async def frames():
        for frame in encode_frames(header, values):
            yield frame
        await hold.wait()

    stub = clients.stub(address, header.receiver)
    calls = [stub.PushSlices(frames(), timeout=60) for _ in range(streams)]
    waits = [asyncio.ensure_future(call) for call in calls]
    give_up = time.monotonic() + FLOOD_WAIT_S
    # Every stream but the one the daemon took is answered; a little longer shows it keeps
    # that one open rather than answering it late.
    while sum(wait.done() for wait in waits) < streams - 1 and time.monotonic() < give_up:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    refused = []
    for wait in waits:
        if wait.done():
            error = wait.exception()
            assert isinstance(error, grpc.aio.AioRpcError), error
            refused.append((error.code(), error.details()))
    still_open = sum(not wait.done() for wait in waits)
    return refused, still_open, hold, calls, waits


def test_neighbours_flooding_slices_and_rounds_cannot_grow_a_daemon(
    tmp_path: Path, cluster_ca: ClusterCa
) -> None:
    members = [Member("peer-00", MU), Member("peer-01", MU)]
    units, values = _slice(1, members, "peer-01", "peer-00")
    slice_bytes = sum(v.numel() * 4 for v in values.values())
    # The flood must be able to fail the test: TWINS slices are far beyond the margin.
    assert TWINS * slice_bytes > 3 * RSS_MARGIN, slice_bytes
    # Slowed training keeps round 0 going while the flood comes.
    daemons = start_loopback_daemons(
        tmp_path, 2, ["--task", TASK, "--mu", str(MU), "--rounds", str(ROUNDS), "--sync",
                      "--slowdown", "10"], cluster_ca)
    try:
        target = daemons[0]

        async def scenario() -> tuple:
            clients = PeerClients(cluster_ca.identity("peer-01"))
            try:
                deadline = time.monotonic() + START_TIMEOUT_S
                while True:  # the view is committed and round 0 under way
                    assert time.monotonic() < deadline, [d.output() for d in daemons]
                    try:
                        status = await clients.status(target.address, "peer-00")
                    except grpc.aio.AioRpcError:  # not serving yet
                        await asyncio.sleep(0.2)
                        continue
                    if status.self.view_id and status.self.round == 0:
                        break
                    assert status.self.round == 0, "the flood comes too late to matter"
                    await asyncio.sleep(0.2)
                hello = status.self

                def header(round_index: int) -> peer_pb2.StreamHeader:
                    return peer_pb2.StreamHeader(
                        protocol_version=PROTOCOL_VERSION, cluster=hello.cluster,
                        model_fingerprint=hello.model_fingerprint, sender="peer-01",
                        receiver="peer-00", round=round_index, view_id=hello.view_id,
                        weight=1.0, plan=units)

                refused, still_open, hold, calls, waits = await _flood(
                    target.address, clients, header(1), values, TWINS)
                # Many rounds: far ahead of the window, refused at the header (the sender may
                # retry later); the header alone, so that the answer cannot race the values.
                far = []
                for round_index in (40, 10**9):
                    try:
                        await clients.push(target.address, header(round_index), {})
                    except grpc.aio.AioRpcError as error:
                        far.append(error.code())
                hold.set()
                for call in calls:
                    call.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
                return refused, still_open, far
            finally:
                await clients.close()

        refused, still_open, far = asyncio.run(scenario())
        assert still_open == 1, (still_open, refused[:3])
        assert len(refused) == TWINS - 1
        # Refused at the header; a refusal that races the client's next frames reaches the
        # client as gRPC core's INTERNAL instead of the daemon's answer.
        twins = [details for code, details in refused if code == grpc.StatusCode.UNAVAILABLE]
        assert all("being received" in details for details in twins), twins
        assert all(code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
                   for code, _ in refused), refused
        assert twins, refused
        assert far == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
        # The flood stalled nothing for good: the real slices of round 1 got through.
        assert wait_all(daemons) == [0, 0], [d.output() for d in daemons]
        assert [r["round"] for r in target.rounds()] == list(range(1, ROUNDS + 1))
        # Memory: the flooded daemon against its twin, which ran the same rounds unflooded. The
        # driver's bound (RoundDriver.inbox_bound_bytes): strict rounds take this round's and
        # the next one's slice from each neighbour, here one. Unbounded, the flood alone would
        # have added TWINS slices.
        flooded, quiet = (d.rounds()[-1]["rss_peak_bytes"] for d in daemons)
        inbox_bound = 2 * slice_bytes
        assert flooded - quiet <= inbox_bound + RSS_MARGIN, (flooded, quiet, slice_bytes)
    finally:
        kill_all(daemons)
