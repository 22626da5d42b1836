"""msfusion's whole groups (`--whole-groups`): every member keeps all units of the named groups,
the other groups keep exactly today's windows; a name the model lacks is refused at build."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peerd.algorithm.plan import Member, MSFusionPlanner, width_groups
from peerd.algorithm.submodel import init_params
from peerd.capacity import probe_width
from peerd.config import ConfigError, SimConfig, TrainConfig, parse_whole_groups_text
from peerd.models.base import ModelSpec
from peerd.models.cnn import CNNConfig, CNNSpec
from peerd.models.transformer import TransformerConfig, TransformerSpec
from peerd.sim import build
from peerd.tasks import get_task

MEMBERS = [Member(f"peer-{index}", mu) for index, mu in enumerate((0.25, 0.25, 0.5, 0.125, 0.25))]
TRANSFORMER = TransformerSpec(TransformerConfig(vocab_size=32, block_size=8, n_layer=2, n_head=4,
                                                head_dim=4, d_model=16, d_ffn=32))
CNN = CNNSpec(CNNConfig(image_size=8, stage_widths=(16, 32), blocks_per_stage=2,
                        channels_per_unit=2))


@pytest.mark.parametrize(("spec", "whole"), [(TRANSFORMER, "embd"), (CNN, "res0,res1")])
def test_whole_groups_are_whole_and_the_other_windows_are_todays(spec: ModelSpec,
                                                                 whole: str) -> None:
    kept = set(whole.split(","))
    today, planner = MSFusionPlanner(7), MSFusionPlanner(7, whole_groups=whole)
    windowed = [group.name for group in width_groups(spec.groups) if group.name not in kept]
    assert windowed  # the test compares something
    for round_index in (0, 1, 5, 63, 200):
        plans = planner.plan(round_index, MEMBERS, spec.groups)
        reference = today.plan(round_index, MEMBERS, spec.groups)
        for member in MEMBERS:
            plan = plans[member.peer_id]
            for name in kept:
                assert torch.equal(plan[name], torch.arange(spec.groups[name].units))
            for name in windowed:
                assert torch.equal(plan[name], reference[member.peer_id][name])
                assert len(plan[name]) < spec.groups[name].units


def test_an_unknown_group_is_refused_with_the_models_groups() -> None:
    planner = MSFusionPlanner(0, whole_groups="res0,res9")
    with pytest.raises(ValueError, match=re.escape(
            "no group res9; its groups are res0, s0b0.mid, s0b1.mid, res1, s1b0.mid, s1b1.mid")):
        planner.plan(0, MEMBERS, CNN.groups)


def test_an_unknown_group_fails_the_sim_at_build(tmp_path: Path) -> None:
    config = SimConfig(peers=2, rounds=1, task="digits", whole_groups="embd", out=str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(
            "no group embd; its groups are res0, s0b0.mid, res1, s1b0.mid")):
        build(config)


@pytest.mark.parametrize(("text", "allowed"), [
    ("res1, res0", "res0,res1"), ("embd", "embd"), ("embd,,res0", None), ("embd,embd", None),
    (",", None)])
def test_whole_group_lists_are_checked_and_sorted(text: str, allowed: str | None) -> None:
    if allowed is not None:
        assert parse_whole_groups_text(text) == allowed
        return
    with pytest.raises(ConfigError, match=r"whole_groups=.* is invalid: must be a comma list"):
        parse_whole_groups_text(text)


def test_whole_groups_and_learned_widths_are_refused_together() -> None:
    with pytest.raises(ConfigError, match="cannot be combined with learned_width"):
        SimConfig(whole_groups="embd", learned_width=True, mu=(0.5,))


def test_the_capacity_probe_measures_the_sub_model_with_its_whole_groups() -> None:
    """mu auto probes the sub-model the daemon's planner gives, whole groups included."""
    task = get_task("digits")
    data = task.load_data()
    spec = task.model(data, False)
    params = init_params(spec, 0)
    split = data.train.subset(torch.arange(64).numpy())
    config = TrainConfig(batch_size=16)
    windowed = probe_width(spec, params, split, config, 0.25, steps=1)
    whole = probe_width(spec, params, split, config, 0.25, steps=1,
                        planner=MSFusionPlanner(0, whole_groups="res0,res1"))
    assert whole.memory.param_bytes > 2 * windowed.memory.param_bytes


def test_a_digits_sim_with_whole_residual_groups_learns(tmp_path: Path) -> None:
    """`peerd sim --whole-groups` end to end: the CNN's residual streams whole, its mid groups
    windowed at mu 0.25."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "peerd.cli", "sim", "--task", "digits", "--peers", "4",
               "--mu", "0.25", "--rounds", "5", "--whole-groups", "res1,res0", "--quiet",
               "--out", str(tmp_path)]
    subprocess.run(command, check=True, env=environment, capture_output=True, timeout=300)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["global_acc"] >= 0.85  # 0.93 in the run that set it
    # The residual widths are whole: a peer's FLOPs per sample exceed mu^2 of the full model's.
    ratio = records[-1]["flops_per_sample_peer_mean"] / records[-1]["flops_per_sample_full"]
    assert 0.15 < ratio < 0.5
