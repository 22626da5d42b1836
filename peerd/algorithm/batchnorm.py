"""BatchNorm statistics recomputed for a model that is evaluated.

Running statistics travel with their channels and are averaged like parameters, but an
average of statistics that sub-models of different windows recorded is not the statistics
of the assembled model: each sub-model normalises what its own kept channels produce. Before a
model with BatchNorm is scored (and exported), its running mean and variance are recomputed
from a fixed sample of training inputs: a cumulative average over the sample, in train mode,
with no gradient (docs/MODELS.md, BatchNorm)."""

from __future__ import annotations

import torch
from torch import nn

CALIBRATION_SAMPLES = 512
CALIBRATION_BATCH = 128
CALIBRATION_SEED = 0


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [layer for layer in module.modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats]


def calibration_inputs(inputs: torch.Tensor, samples: int = CALIBRATION_SAMPLES) -> torch.Tensor:
    """The same seeded sample of training inputs for every evaluation."""
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    order = torch.randperm(len(inputs), generator=generator)[:samples]
    return inputs[order.sort().values]


@torch.no_grad()
def recompute_batchnorm(module: nn.Module, inputs: torch.Tensor) -> None:
    """Replace every BatchNorm's running statistics by those of `inputs`, in place; the module
    is left in eval mode. A module without BatchNorm is left as it is."""
    layers = batchnorms(module)
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the calibration batches
    module.train()
    for start in range(0, len(inputs), CALIBRATION_BATCH):
        module(inputs[start:start + CALIBRATION_BATCH])
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    module.eval()
