"""The balanced softmax: the local label prior taken out of the logits (issue 23)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from peerd.algorithm.engine import TRAIN_FLOPS_PER_FORWARD
from peerd.algorithm.losses import BalancedSoftmax, log_label_prior, task_loss
from peerd.config import ConfigError, SimConfig, TrainConfig
from peerd.sim import build, run_round

CLASSES = 4


class Bias(nn.Module):
    """Logits that ignore the input: what a model learns of the label prior alone."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(CLASSES))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(inputs), CLASSES)


def _fit_bias(targets: torch.Tensor, balanced: bool) -> torch.Tensor:
    model = Bias()
    objective = BalancedSoftmax("image", targets)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs = torch.zeros(len(targets), 1)
    for _ in range(300):
        loss = (objective(model, inputs, targets) if balanced
                else task_loss("image", model(inputs), targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.bias.detach()


def test_the_prior_is_smoothed_and_sums_to_one() -> None:
    prior = log_label_prior(torch.tensor([0, 0, 0, 1]), CLASSES).exp()
    torch.testing.assert_close(prior, torch.tensor([4.0, 2.0, 1.0, 1.0]) / 8)


def test_a_skewed_peer_learns_no_prior() -> None:
    """On a shard of 90% class 0 and 10% class 1, plain CE puts the prior into the logits
    (class 1 about log 9 below class 0, the absent classes far below); the balanced softmax
    leaves the classes present level and pushes the absent ones down far less."""
    targets = torch.tensor([0] * 90 + [1] * 10)
    plain, balanced = _fit_bias(targets, False), _fit_bias(targets, True)
    assert float(plain[0] - plain[1]) > 1.5
    assert abs(float(balanced[0] - balanced[1])) < 0.2
    assert float(balanced[0] - balanced[2:].max()) < 0.5 * float(plain[0] - plain[2:].max())


def test_a_uniform_prior_is_plain_cross_entropy() -> None:
    targets = torch.arange(CLASSES).repeat(5)
    logits = torch.randn(len(targets), CLASSES)
    model = nn.Identity()
    torch.testing.assert_close(BalancedSoftmax("image", targets)(model, logits, targets),
                               task_loss("image", logits, targets))


def test_text_counts_every_position() -> None:
    targets = torch.tensor([[0, 0, 1], [0, 2, 2]])
    prior = log_label_prior(targets, CLASSES).exp()
    torch.testing.assert_close(prior, torch.tensor([4.0, 2.0, 3.0, 1.0]) / 10)


def test_a_round_with_it_trains_and_costs_plain_training(tmp_path: Path) -> None:
    """It changes the trained parameters, not the FLOPs: no extra forwards are charged."""
    params = {}
    for balanced in (False, True):
        config = SimConfig(peers=2, rounds=1, mu=(0.5,), out=str(tmp_path), seed=3,
                           partition="dirichlet:0.5",
                           train=TrainConfig(max_local_steps=3, balanced_softmax=balanced))
        sim = build(config)
        _, stats = run_round(sim, 0)
        assert stats[0].train_flops == (TRAIN_FLOPS_PER_FORWARD * stats[0].samples
                                        * stats[0].forward_flops_per_sample)
        params[balanced] = sim.engines[0].params
    assert any(not torch.equal(params[False][name], params[True][name]) for name in params[True])


@pytest.mark.parametrize("other", ["contrastive", "early_exits"])
def test_it_is_not_combined_with_other_objectives(other: str) -> None:
    with pytest.raises(ConfigError, match="balanced_softmax=True is invalid with contrastive"):
        TrainConfig(balanced_softmax=True, **{other: True})
