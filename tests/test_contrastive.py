"""The model-contrastive term: its value is the formula, off is the plain task loss, on changes
training and is charged two frozen forwards per sample."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from peerd.algorithm.engine import TRAIN_FLOPS_PER_FORWARD, Engine, sgd, train_step
from peerd.algorithm.losses import ModelContrastive, contrastive_loss, representation, task_loss
from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.submodel import Params, extract, init_params, write_back
from peerd.algorithm.topology import load_topology
from peerd.cli import build_parser
from peerd.config import ConfigError, TrainConfig
from peerd.data import load_task_data
from peerd.models import CNNConfig, CNNSpec, TransformerConfig, TransformerSpec
from peerd.models.base import full_plan

SPEC = CNNSpec(CNNConfig(image_size=8, stage_widths=(16, 32)))
SEED = 5


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_contrastive_loss_equals_the_formula_by_hand() -> None:
    local = [[1.0, 0.0, 2.0], [0.5, -1.0, 1.0]]
    aggregated = [[1.0, 1.0, 1.0], [0.0, -2.0, 1.0]]
    previous = [[-1.0, 0.0, 3.0], [2.0, 1.0, 0.0]]
    tau = 0.5
    expected = 0.0
    for z, positive, negative in zip(local, aggregated, previous, strict=True):
        pos = math.exp(_cosine(z, positive) / tau)
        neg = math.exp(_cosine(z, negative) / tau)
        expected += -math.log(pos / (pos + neg))
    expected /= len(local)
    value = contrastive_loss(torch.tensor(local), torch.tensor(aggregated),
                             torch.tensor(previous), tau)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # Equal positive and negative similarity: log 2 whatever tau is.
    same = torch.tensor(local)
    assert contrastive_loss(same, same, same, 0.1).item() == pytest.approx(math.log(2), rel=1e-6)


def test_representation_pools_transformer_positions_only() -> None:
    hidden = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(representation(hidden), hidden.mean(dim=1))
    pooled = torch.arange(8.0).reshape(2, 4)
    assert torch.equal(representation(pooled), pooled)


def _engine(config: TrainConfig) -> Engine:
    data = load_task_data("digits")
    indices = torch.arange(0, 192).numpy()
    return Engine("p0", SPEC, init_params(SPEC, SEED), data.train.subset(indices),
                  data.test.subset(indices[:20]), make_planner("msfusion", SEED),
                  load_topology("ring"), config, SEED)


def _train_rounds(config: TrainConfig, rounds: int) -> tuple[list[Params], list]:
    """The parameters after each round's training, and each round's stats."""
    engine = _engine(config)
    members = [Member("p0", 0.5)]
    snapshots, stats = [], []
    for round_index in range(rounds):
        stats.append(engine.train(engine.begin_round(round_index, members)))
        snapshots.append({name: t.clone() for name, t in engine.params.items()})
    return snapshots, stats


def _equal(a: Params, b: Params) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


def test_off_is_plain_cross_entropy_bit_identically() -> None:
    config = TrainConfig(lr=0.05, batch_size=16, max_local_steps=2)
    snapshots, _ = _train_rounds(config, 2)
    # The same two rounds by hand with the task loss alone.
    reference = _engine(config)
    planning = _engine(config)
    members = [Member("p0", 0.5)]
    for round_index in range(2):
        ctx = planning.begin_round(round_index, members)
        plan = planning.own_plan(ctx)
        module = extract(SPEC, reference.params, plan)
        optimizer = sgd(module, config)
        order = planning._batch_order(round_index)
        for step in range(2):
            batch = order[step * 16:(step + 1) * 16]
            loss = task_loss(SPEC.kind, module(reference.train_split.inputs[batch]),
                             reference.train_split.targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        write_back(SPEC, reference.params, plan, module)
    assert _equal(snapshots[1], reference.params)


def test_on_changes_training_from_the_second_round_and_is_charged() -> None:
    off = TrainConfig(lr=0.05, batch_size=16, max_local_steps=2)
    on = TrainConfig(lr=0.05, batch_size=16, max_local_steps=2, contrastive=True,
                     contrastive_weight=1.0, contrastive_tau=0.5)
    plain_params, plain = _train_rounds(off, 2)
    contrast_params, contrast = _train_rounds(on, 2)
    # Round 0 has no previous local model: the term is skipped, training is the same.
    assert _equal(plain_params[0], contrast_params[0])
    assert contrast[0].frozen_forwards == 0
    assert not _equal(plain_params[1], contrast_params[1])
    assert contrast[1].loss != plain[1].loss
    # Two frozen forwards per sample on top of forward + backward.
    assert contrast[1].frozen_forwards == 2
    assert contrast[1].train_flops == (
        (TRAIN_FLOPS_PER_FORWARD + 2) * contrast[1].forward_flops_per_sample
        * contrast[1].samples)
    assert plain[1].train_flops == (
        TRAIN_FLOPS_PER_FORWARD * plain[1].forward_flops_per_sample * plain[1].samples)


def test_zero_weight_objective_matches_the_task_loss_step() -> None:
    data = load_task_data("digits")
    inputs, targets = data.train.inputs[:16], data.train.targets[:16]
    params = init_params(SPEC, SEED)
    frozen = extract(SPEC, params, full_plan(SPEC))
    config = TrainConfig()
    results = []
    for objective in (None, ModelContrastive(SPEC.kind, frozen, frozen, 0.0, 0.5)):
        module = extract(SPEC, params, full_plan(SPEC))
        loss = train_step(SPEC.kind, config, module, sgd(module, config), inputs, targets,
                          objective)
        results.append((loss, [p.detach().clone() for p in module.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_transformer_term_uses_pooled_hidden_states() -> None:
    spec = TransformerSpec(TransformerConfig(vocab_size=11, block_size=8, d_model=16,
                                             n_layer=1, n_head=2, head_dim=8, d_ffn=32))
    params = init_params(spec, SEED)
    tokens = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(SEED))
    module = extract(spec, params, full_plan(spec))
    aggregated = extract(spec, params, full_plan(spec))
    previous = extract(spec, init_params(spec, SEED + 1), full_plan(spec))
    objective = ModelContrastive(spec.kind, aggregated, previous, 2.0, 0.5)
    loss = objective(module, tokens, tokens)
    with torch.no_grad():
        z = representation(module.features(tokens))
        expected = task_loss(spec.kind, module(tokens), tokens) + 2.0 * contrastive_loss(
            z, representation(aggregated.features(tokens)),
            representation(previous.features(tokens)), 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())
    assert all(p.grad is None for p in previous.parameters())


@pytest.mark.parametrize(("options", "message"), [
    ({"contrastive_tau": 0.0}, "contrastive_tau=0.0 is invalid"),
    ({"contrastive_weight": -1.0}, "contrastive_weight=-1.0 is invalid"),
    ({"contrastive": True, "early_exits": True}, "not combined with early exits"),
])
def test_bad_contrastive_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_cli_flags_reach_the_train_config(capsys: pytest.CaptureFixture[str]) -> None:
    from peerd.cli import config_from_args
    from peerd.config import SimConfig
    from peerd.tasks import get_task

    def train_config(args: argparse.Namespace) -> TrainConfig:
        return config_from_args(SimConfig, args).train_config(get_task(args.task).train)

    args = build_parser().parse_args(
        ["sim", "--task", "fmnist", "--contrastive", "--contrastive-weight", "0.25",
         "--contrastive-tau", "0.1", "--overlap", "decay:8"])
    config = train_config(args)
    assert (config.contrastive, config.contrastive_weight, config.contrastive_tau) == (
        True, 0.25, 0.1)
    assert config.batch_size == 64  # the task's defaults are kept
    assert args.overlap == "decay:8"
    assert train_config(build_parser().parse_args(["sim"])).contrastive is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sim", "--contrastive-tau", "0"])
    assert "--contrastive-tau" in capsys.readouterr().err
