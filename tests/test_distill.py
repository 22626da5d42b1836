"""Self-distillation over early exits, freezing, and the options that switch them on."""

from __future__ import annotations

import math

import pytest
import torch
from support import one_torch_thread  # noqa: F401 (autouse fixture)

from peerd.algorithm.engine import sgd, train_step
from peerd.algorithm.losses import early_exit_loss
from peerd.algorithm.submodel import extract, freeze_shallowest, init_params
from peerd.capacity import measure_step
from peerd.config import (
    ConfigError,
    DaemonConfig,
    SimConfig,
    TrainConfig,
    load_daemon_config,
    parse_depth,
)
from peerd.models import CNNConfig, CNNSpec, full_plan
from peerd.sim import build, run_round

CNN = CNNSpec(CNNConfig(image_size=8, stage_widths=(8, 16), blocks_per_stage=2,
                        early_exits=True))


def by_hand(exits: list[list[list[float]]], targets: list[int], temperature: float | None
            ) -> float:
    """CE on every exit + T^2 * mean over samples of KL(deepest || shallower), in plain floats."""
    def log_softmax(row: list[float], t: float) -> list[float]:
        top = max(v / t for v in row)
        norm = top + math.log(sum(math.exp(v / t - top) for v in row))
        return [v / t - norm for v in row]

    total = 0.0
    for logits in exits:
        total += sum(-log_softmax(row, 1.0)[y] for row, y in zip(logits, targets, strict=True)
                     ) / len(targets)
    if temperature is None:
        return total
    for student in exits[:-1]:
        kl = 0.0
        for s_row, t_row in zip(student, exits[-1], strict=True):
            p_t, p_s = log_softmax(t_row, temperature), log_softmax(s_row, temperature)
            kl += sum(math.exp(a) * (a - b) for a, b in zip(p_t, p_s, strict=True))
        total += temperature**2 * kl / len(targets)
    return total


@pytest.mark.parametrize("temperature", [3.0, 1.0, 7.5, None])
def test_loss_is_ce_on_every_exit_plus_t2_kl(temperature: float | None) -> None:
    generator = torch.Generator().manual_seed(0)
    exits = [torch.randn(5, 4, generator=generator, dtype=torch.float64) * 2 for _ in range(3)]
    targets = torch.tensor([0, 3, 1, 1, 2])
    loss = early_exit_loss("image", exits, targets, temperature)
    expected = by_hand([e.tolist() for e in exits], targets.tolist(), temperature)
    assert float(loss) == pytest.approx(expected, rel=1e-9)


def test_distillation_changes_the_loss_and_text_logits_flatten_per_position() -> None:
    generator = torch.Generator().manual_seed(1)
    exits = [torch.randn(2, 3, 6, generator=generator, dtype=torch.float64) for _ in range(2)]
    targets = torch.randint(0, 6, (2, 3), generator=generator)
    flat = [e.reshape(6, 6).tolist() for e in exits]
    for temperature in (3.0, None):
        loss = early_exit_loss("text", exits, targets, temperature)
        assert float(loss) == pytest.approx(by_hand(flat, targets.reshape(-1).tolist(),
                                                    temperature), rel=1e-9)
    assert float(early_exit_loss("text", exits, targets, 3.0)) > float(
        early_exit_loss("text", exits, targets, None))


def test_the_teacher_is_detached() -> None:
    """The KL term moves the shallow exit only: the deepest exit's gradient is its CE's."""
    generator = torch.Generator().manual_seed(2)
    shallow = torch.randn(4, 5, generator=generator, requires_grad=True)
    deep = torch.randn(4, 5, generator=generator, requires_grad=True)
    targets = torch.tensor([1, 0, 4, 2])
    early_exit_loss("image", [shallow, deep], targets, 3.0).backward()
    ce_only = deep.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(ce_only, targets).backward()
    assert torch.allclose(deep.grad, ce_only.grad)
    assert shallow.grad is not None and shallow.grad.abs().sum() > 0


def test_frozen_blocks_get_no_gradient_no_optimizer_state_and_save_no_activations() -> None:
    config = TrainConfig(early_exits=True, lr=0.1)
    params = init_params(CNN, 0)
    inputs = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    targets = torch.arange(8) % 10
    memories = {}
    for frozen in (0, 2):
        module = extract(CNN, params, full_plan(CNN))
        freeze_shallowest(CNN, module, frozen)
        optimizer = sgd(module, config)
        memories[frozen] = measure_step(
            lambda m=module, o=optimizer, f=frozen: train_step("image", config, m, o, inputs,
                                                               targets, f), module, optimizer)
        trained = {id(p) for p in optimizer.state}
        for name, parameter in module.named_parameters():
            is_frozen = CNN.param_blocks.get(name, -1) < frozen
            assert (parameter.grad is None) == is_frozen, name
            assert (id(parameter) in trained) == (not is_frozen), name
            assert torch.equal(parameter.detach(), params[name]) == is_frozen, name
    assert memories[2].grad_bytes < memories[0].grad_bytes
    assert memories[2].optimizer_bytes < memories[0].optimizer_bytes
    assert memories[2].activation_bytes < memories[0].activation_bytes


def test_a_frozen_block_still_takes_its_neighbours_values_in_merge() -> None:
    sim = build(SimConfig(peers=2, rounds=1, mu=(1.0,), topology="full", early_exits=True,
                          train=TrainConfig(early_exits=True, max_local_steps=1)))
    frozen, other = sim.engines
    frozen.frozen_blocks = 1
    before = {n: t.clone() for n, t in frozen.params.items()}
    contexts = [engine.begin_round(0, sim.members) for engine in sim.engines]
    for engine, ctx in zip(sim.engines, contexts, strict=True):
        engine.train(ctx)
    name = "blocks.0.conv1.weight"
    assert torch.equal(frozen.params[name], before[name])  # not trained here
    assert not torch.equal(other.params[name], before[name])
    expected = (frozen.params[name] * frozen.weight + other.params[name] * other.weight) / (
        frozen.weight + other.weight)
    messages = {e.peer_id: e.outbox(ctx) for e, ctx in zip(sim.engines, contexts, strict=True)}
    frozen.merge(contexts[0], messages[other.peer_id])
    assert torch.allclose(frozen.params[name], expected)
    assert not torch.equal(frozen.params[name], before[name])


def test_mixed_depths_in_the_simulator_train_every_weight() -> None:
    """Four peers, depths 2,1,2,1 and widths 0.5,0.25: every weight is trained within a few
    rounds (coverage 1.0; a short drift period of 8), and the deep peers spend more FLOPs per
    sample than the shallow."""
    sim = build(SimConfig(peers=4, rounds=1, mu=(0.5, 0.25), depth=(2, 1), drift_period=8,
                          early_exits=True,
                          train=TrainConfig(early_exits=True, max_local_steps=1, batch_size=8)))
    for round_index in range(20):
        contexts, stats = run_round(sim, round_index)
        if sim.coverage.fraction == 1.0:
            break
    assert sim.coverage.fraction == 1.0, sim.coverage.untrained()
    own_depths = [len(ctx.plans_now[engine.peer_id]["depth"])
                  for engine, ctx in zip(sim.engines, contexts, strict=True)]
    assert own_depths == [2, 1, 2, 1]
    flops = [stat.forward_flops_per_sample for stat in stats]
    assert min(flops[0], flops[2]) > max(flops[1], flops[3])


@pytest.mark.parametrize(("make", "message"), [
    (lambda: parse_depth("0"), "depth=0 is invalid: must be >= 1"),
    (lambda: parse_depth("2,x"), "depth='2,x' is invalid"),
    (lambda: SimConfig(depth=(2,)), "needs early_exits"),
    (lambda: TrainConfig(distill_temperature=0.0), "distill_temperature=0.0 is invalid"),
    (lambda: build(SimConfig(depth=(3,), early_exits=True)),
     r"depth=3 is invalid: must be in 1\.\.2 \(the model's blocks\)"),
    (lambda: DaemonConfig(depth=0, early_exits=True), "depth=0 is invalid: must be >= 1"),
    (lambda: DaemonConfig(depth=1), "depth=1 needs early_exits"),
    (lambda: DaemonConfig(frozen_blocks=1), "frozen_blocks=1 needs early_exits"),
    (lambda: DaemonConfig(depth=2, frozen_blocks=2, early_exits=True),
     r"frozen_blocks=2 is invalid: must be less than depth \(2\)"),
    (lambda: DaemonConfig(early_exits=True, distill_temperature=-3.0),
     "distill_temperature=-3.0 is invalid"),
    (lambda: load_daemon_config(None, {"PEERD_DEPTH": "two"}, {}), "depth='two' is invalid"),
])
def test_bad_depth_and_temperature_are_config_errors(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()
