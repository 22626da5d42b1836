"""BatchNorm statistics recomputed before a model is scored (peerd/algorithm/batchnorm.py)."""

from __future__ import annotations

import torch
from torch import nn

from peerd.algorithm.batchnorm import calibration_inputs, recompute_batchnorm


def test_recomputed_statistics_are_those_of_the_calibration_inputs() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[0].running_mean.fill_(40.0)  # what an average of sub-models' statistics might hold
    model[0].running_var.fill_(90.0)
    torch.manual_seed(0)
    # Two calibration batches of equal size: the average of their means is the overall mean;
    # the average of their variances is close to the overall variance.
    inputs = torch.randn(256, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([5.0, 0.0, -1.0])
    recompute_batchnorm(model, inputs)
    assert not model.training
    torch.testing.assert_close(model[0].running_mean, inputs.mean(dim=0))
    torch.testing.assert_close(model[0].running_var, inputs.var(dim=0), rtol=0.05, atol=0.0)
    assert model[0].momentum == 0.1  # restored


def test_the_calibration_sample_is_fixed_and_bounded() -> None:
    inputs = torch.arange(2000.0).unsqueeze(1)
    first, again = calibration_inputs(inputs), calibration_inputs(inputs)
    assert torch.equal(first, again) and len(first) == 512
    assert len(torch.unique(first)) == 512
    assert len(calibration_inputs(inputs[:100])) == 100
