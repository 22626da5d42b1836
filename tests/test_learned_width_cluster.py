"""Learned widths with real daemons: `peerd cluster --learned-width` announces each daemon's
widths in the handshake, every daemon plans with them (the same widths `peerd sim` learns),
and a peer announcing widths that do not fit the model is refused."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
from daemons import ClusterCa, kill_all, start_loopback_daemons

from peerd.agreement import agreed_settings, cluster_fingerprint
from peerd.algorithm.width import flops_budget, widths_flops
from peerd.config import DaemonConfig, SimConfig
from peerd.data import load_task_data
from peerd.models.base import fingerprint
from peerd.net import PROTOCOL_VERSION
from peerd.net.client import PeerClients
from peerd.net.codec import WireError
from peerd.sim import build
from peerd.tasks import get_task
from peerd.v1 import peer_pb2

MIXED = (0.5, 0.25, 0.125)
ROUNDS = 2
EPOCHS = 2  # of unit scoring: enough to check the wiring, cheap at start


def test_a_cluster_with_learned_widths_plans_with_them(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "cluster", "--peers", "3", "--mu",
         ",".join(map(str, MIXED)), "--rounds", str(ROUNDS), "--learned-width",
         "--width-epochs", str(EPOCHS), "--quiet", "--no-mdns", "--sync",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    # The simulator learns the same widths for the same peers (same data, seed, parameters).
    sim = build(SimConfig(peers=3, mu=MIXED, learned_width=True, width_epochs=EPOCHS,
                          rounds=1))
    spec = sim.spec
    for position, member in enumerate(sim.members):
        peer_dir = tmp_path / f"peer-{position:02d}"
        state = json.loads((peer_dir / "state.json").read_text())
        view = {entry[0]: entry for entry in state["view"]}
        peer_id, mu, depth, widths = view[member.peer_id]
        assert (peer_id, mu, depth) == (member.peer_id, member.mu, None)
        assert tuple((name, units) for name, units in widths) == member.widths
        # Within the uniform sub-model's budget, and the daemon trained a sub-model of
        # exactly these widths.
        assert widths_flops(spec, member.widths) <= flops_budget(spec, mu)
        first = json.loads((peer_dir / "rounds.jsonl").read_text().splitlines()[0])
        assert first["forward_flops_per_sample"] == widths_flops(spec, member.widths)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == ROUNDS and records[-1]["global_acc"] is not None


def test_widths_that_do_not_fit_the_model_are_refused(tmp_path: Path,
                                                       cluster_ca: ClusterCa) -> None:
    daemons = start_loopback_daemons(tmp_path, 1, ["--min-peers", "2"], cluster_ca)
    # The fingerprint a default daemon announces: the model and its planner settings.
    model = cluster_fingerprint(
        fingerprint(get_task("digits").model(load_task_data("digits", None))),
        agreed_settings(DaemonConfig()))

    async def introduce(widths: list[int]) -> tuple[grpc.StatusCode, str]:
        hello = peer_pb2.Hello(protocol_version=PROTOCOL_VERSION, cluster="default",
                               peer_id="stranger", model_fingerprint=model,
                               capacity=peer_pb2.Capacity(mu=0.25, widths=widths),
                               address="127.0.0.1:9")
        for _ in range(300):  # until the daemon serves
            clients = PeerClients(cluster_ca.identity("stranger"))
            try:
                await clients.handshake(daemons[0].address, hello)
                return grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    return error.code(), error.details()
                await asyncio.sleep(0.1)
            except WireError:  # not serving TLS yet
                await asyncio.sleep(0.1)
            finally:
                await clients.close()
        return grpc.StatusCode.UNAVAILABLE, ""

    try:
        code, detail = asyncio.run(introduce([2, 2, 99, 4]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "learned width 99 of group res1 is outside 1..16" in detail
        code, detail = asyncio.run(introduce([2, 2]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "2 learned widths for a model of 4 groups" in detail
        assert asyncio.run(introduce([2, 2, 4, 4]))[0] == grpc.StatusCode.OK
    finally:
        kill_all(daemons)
