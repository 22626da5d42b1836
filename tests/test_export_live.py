"""`peerd export --addr`: from a running cluster of real daemons over gRPC and mutual TLS,
training a user's task (the ResNet example, with BatchNorm statistics), the model equals what the
simulator of the same run assembles (a synchronous run of daemons equals the simulator bit for
bit), loads strictly into the user's class, and what goes wrong is named in one line."""

from __future__ import annotations

import asyncio
import gc
import runpy
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from daemons import ClusterCa, RunningDaemon, kill_all, start_loopback_daemons
from safetensors import safe_open
from safetensors.torch import load_file

from peerd.algorithm.plan import planner_for
from peerd.algorithm.submodel import Params, init_params
from peerd.cli import main
from peerd.cluster import free_ports
from peerd.config import SimConfig
from peerd.live_model import MemberPull, pull_into
from peerd.metrics import GlobalEvaluation, evaluate_global
from peerd.models.base import Plan
from peerd.net import PROTOCOL_VERSION
from peerd.net.client import PeerClients
from peerd.net.codec import Expectation
from peerd.net.tls import TlsIdentity
from peerd.ops.ca import OBSERVER_ROLE, READER_ROLE, init_ca, issue
from peerd.sim import build, run_round
from peerd.v1 import peer_pb2

ROUNDS = 2
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resnet_images.py"
TASK = f"{EXAMPLE}:small_task"
SHARED = ["--task", TASK, "--rounds", str(ROUNDS), "--topology", "ring", "--sync", "--linger",
          "120"]


@pytest.fixture(scope="module")
def lingering(tmp_path_factory: pytest.TempPathFactory, cluster_ca: ClusterCa):
    """Three daemons that finished their rounds and keep serving pulls."""
    daemons = start_loopback_daemons(tmp_path_factory.mktemp("live"), 3, SHARED, cluster_ca)
    try:
        for daemon in daemons:
            daemon.wait_rounds(ROUNDS)
        yield daemons
    finally:
        kill_all(daemons)


CONFIG = SimConfig(peers=3, rounds=ROUNDS, topology="ring", out="unused", task=TASK)


@pytest.fixture(scope="module")
def simulated() -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The same run in the simulator, and its global model as `peerd sim` assembles and scores
    it after the last round."""
    config = CONFIG
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the daemons train with one thread each
    try:
        sim = build(config)
        for round_index in range(ROUNDS):
            run_round(sim, round_index)
    finally:
        torch.set_num_threads(threads)
    plans = planner_for(config, sim.spec).plan(ROUNDS - 1, sim.members, sim.spec.groups)
    figures, model = evaluate_global(sim.spec, sim.data,
                                     {engine.peer_id: engine.params for engine in sim.engines},
                                     plans, sim.eval_samples)
    return figures, model.state_dict()


@pytest.fixture(scope="module")
def reader(cluster_ca: ClusterCa) -> Path:
    """An operator's certificate: may call Status and Pull, never joins."""
    return issue(cluster_ca.directory, "operator", None, False, READER_ROLE).directory


def export(address: str, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peerd.cli", "export", "--addr", address,
                           "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=60)


def test_export_by_address_equals_the_simulated_model(
    lingering: list[RunningDaemon], simulated: tuple[dict[str, float], dict[str, torch.Tensor]],
    reader: Path, tmp_path: Path,
) -> None:
    destination = tmp_path / "live.safetensors"
    done = export(lingering[1].address, destination, "--tls-dir", str(reader), "--task", TASK)
    assert done.returncode == 0, done.stderr
    figures, expected = simulated
    reported = figures["global_acc"]
    assert f"after round {ROUNDS}, global_acc {reported:.4f}" in done.stdout, done.stdout
    live = load_file(str(destination))
    assert live.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(live[name], tensor), name
    with safe_open(str(destination), framework="pt") as model:
        assert model.metadata()["round"] == str(ROUNDS)
    assert any(name.endswith("running_var") for name in live)
    # What the user does: the task's own class, a strict load, argmax over its test set.
    task = runpy.run_path(str(EXAMPLE))["small_task"]()
    user_model = task.model()
    user_model.load_state_dict(live, strict=True)
    user_model.eval()
    inputs, targets = task.test.tensors
    with torch.no_grad():
        correct = int((user_model(inputs).argmax(dim=-1) == targets).sum())
    assert correct / len(targets) == reported


def other_ca_reader(root: Path) -> Path:
    return issue(init_ca(root / "other-ca"), "stranger", None, False, READER_ROLE).directory


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unreachable", "UNAVAILABLE"),
        ("other_ca", "certificate verify failed"),
        ("observer", "Pull needs a device or reader certificate"),
        ("other_task", "model fingerprint"),
        ("other_options", "planner fingerprint"),
        ("no_certificate", "TLS files missing"),
    ],
)
def test_what_goes_wrong_is_one_line(
    case: str, message: str, lingering: list[RunningDaemon], reader: Path,
    cluster_ca: ClusterCa, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    address, flags = lingering[0].address, ["--tls-dir", str(reader), "--task", TASK]
    if case == "unreachable":
        address = f"127.0.0.1:{free_ports(1)[0]}"
    elif case == "other_ca":
        flags[1] = str(other_ca_reader(tmp_path))
    elif case == "observer":
        observer = issue(cluster_ca.directory, "observer", None, False, OBSERVER_ROLE)
        flags[1] = str(observer.directory)
    elif case == "other_task":
        flags[3] = "digits"
    elif case == "other_options":
        # A planner option every member must share, as the cluster's config file would set it.
        config = tmp_path / "peerd.toml"
        config.write_text("seed = 7\n")
        flags += ["--config", str(config)]
    elif case == "no_certificate":
        flags[1] = str(tmp_path / "nothing")
    destination = tmp_path / "model.safetensors"
    # In this process (the command's own error handling, without a second torch import).
    assert main(["export", "--addr", address, "--out", str(destination), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peerd export: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not destination.exists()


class OneMemberAtATime:
    """Adds to a GlobalEvaluation and notes, at every add, how many tensors of the member added
    before it are still alive anywhere in the process."""

    def __init__(self, evaluation: GlobalEvaluation) -> None:
        self.evaluation = evaluation
        self.previous: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_add: list[int] = []

    def add(self, params: Params, plan: Plan) -> None:
        gc.collect()
        self.alive_at_add.append(sum(ref() is not None for ref in self.previous))
        self.previous = [weakref.ref(tensor) for tensor in params.values()]
        self.evaluation.add(params, plan)


def test_the_watchers_member_by_member_evaluation_equals_the_simulators(
    lingering: list[RunningDaemon], simulated: tuple[dict[str, float], dict[str, torch.Tensor]],
    reader: Path,
) -> None:
    """What `peerd cluster`'s watcher does at an evaluation round, over real daemons: each
    member pulled and added in turn (its tensors gone before the next is added), the figures
    and the assembled model those of `evaluate_global` in the simulator."""
    sim = build(CONFIG)
    plans = planner_for(CONFIG, sim.spec).plan(ROUNDS - 1, sim.members, sim.spec.groups)
    shapes = {name: (tensor.dtype, tuple(tensor.shape))
              for name, tensor in init_params(sim.spec, CONFIG.seed).items()}
    watched = OneMemberAtATime(GlobalEvaluation(sim.spec, sim.data, sim.eval_samples))

    async def pull_every_member() -> None:
        clients = PeerClients(TlsIdentity.load(reader))
        try:
            me = (await clients.status(lingering[0].address)).self
            request = peer_pb2.PullRequest(
                protocol_version=PROTOCOL_VERSION, cluster=me.cluster,
                model_fingerprint=me.model_fingerprint, requester="operator", round=ROUNDS)
            expectation = Expectation(PROTOCOL_VERSION, me.cluster, me.model_fingerprint,
                                      lambda header: shapes)
            await pull_into(watched, clients,
                            [MemberPull(d.peer_id, d.address, request) for d in lingering],
                            expectation, plans)
        finally:
            await clients.close()

    asyncio.run(pull_every_member())
    assert watched.alive_at_add == [0, 0, 0]
    figures, model = watched.evaluation.result()
    expected_figures, expected_state = simulated
    assert figures == expected_figures
    state = model.state_dict()
    assert state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(state[name], tensor), name
