"""`peerd bench scale`: a real two-peer cluster, its per-peer bytes checked against the plans."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from peerd.algorithm.aggregate import exchange_count
from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.submodel import init_params
from peerd.bench.scale import _sizes, _topologies, measure
from peerd.data import load_task_data
from peerd.sim import peer_name
from peerd.tasks import BLOCK_SIZE, get_task


def bytes_sent_in_round(round_index: int, peers: int, mu: float) -> list[int]:
    """What each peer of a fully connected digits cluster sends in a round, from the plans."""
    spec = get_task("digits").model(load_task_data("digits", None, block_size=BLOCK_SIZE))
    members = [Member(peer_name(position), mu) for position in range(peers)]
    planner = make_planner("msfusion", 0)
    now = planner.plan(round_index, members, spec.groups)
    following = planner.plan(round_index + 1, members, spec.groups)
    shapes = {name: tensor.shape for name, tensor in init_params(spec, 0).items()}
    return [
        4 * sum(exchange_count(spec, name, shape, now[sender.peer_id], now[receiver.peer_id],
                               following[receiver.peer_id])
                for receiver in members if receiver != sender
                for name, shape in shapes.items())
        for sender in members
    ]


def test_two_peer_cluster_sends_what_the_plans_say(tmp_path: Path) -> None:
    point = measure(2, "full", rounds=2, task="digits", mu=0.5, out=tmp_path)
    assert point.neighbours == 1
    expected = bytes_sent_in_round(1, 2, 0.5)  # the second round: the only one measured
    assert point.bytes_per_peer_round == pytest.approx(sum(expected) / 2)
    assert 0 < point.round_s < 120
    assert torch.tensor(expected).min() > 0


def test_arguments_are_checked() -> None:
    assert _sizes("2,16") == [2, 16]
    with pytest.raises(argparse.ArgumentTypeError, match="at least 2 peers"):
        _sizes("1,4")
    with pytest.raises(argparse.ArgumentTypeError, match="'star'"):
        _topologies("ring,star")
