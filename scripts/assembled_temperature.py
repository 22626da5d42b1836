"""An assembled text model's perplexity at the logit temperature fitted on training samples.

Usage: python scripts/assembled_temperature.py TASK MODEL.safetensors [MODEL.safetensors ...]
           [--test-samples 64] [--train-samples 64]

For each model (what `peerd cluster` and `peerd sim` write as OUT/model.safetensors at every
evaluation): the perplexity on the first `--test-samples` test samples (what the cluster reports
as global_ppl), the temperature T (logits / T, a grid from 0.5 to 3) with the lowest loss on
`--train-samples` seeded training samples, and the test perplexity at that T. Why: a sub-model's
tied LM head scales its input by sqrt(K / k) (docs/ALGORITHM.md, Scaling), so where the peers'
windows have learned the same thing the assembled full-width model's logits come out up to
sqrt(K / k) times sharper than each peer's; one scalar fitted on training data (as BatchNorm
statistics are recomputed on training inputs) separates a wrong scale from wrong predictions.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peerd.algorithm.submodel import extract
from peerd.data import Split
from peerd.models.base import full_plan
from peerd.tasks import get_task

TEMPERATURES = tuple(0.5 + 0.125 * step for step in range(21))  # 0.5 to 3
TRAIN_SEED = 0


@torch.no_grad()
def logits_of(module: torch.nn.Module, split: Split) -> torch.Tensor:
    return torch.cat([module(split.inputs[start:start + 32]) for start in range(0, len(split), 32)])


def loss_at(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy((logits / temperature).flatten(0, 1), targets.flatten()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--test-samples", type=int, default=64)
    parser.add_argument("--train-samples", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = get_task(args.task)
    data = task.load_data(None)
    spec = task.model(data)
    test = data.test.subset(np.arange(min(args.test_samples, len(data.test))))
    picked = np.random.default_rng(TRAIN_SEED).permutation(len(data.train))[:args.train_samples]
    train = data.train.subset(np.sort(picked))
    print("model | test ppl | T fitted on train | test ppl at T")
    for path in args.models:
        module = extract(spec, load_file(path), full_plan(spec)).eval()
        train_logits, test_logits = logits_of(module, train), logits_of(module, test)
        fitted = min(TEMPERATURES, key=lambda t: loss_at(train_logits, train.targets, t))
        print(f"{path} | {math.exp(loss_at(test_logits, test.targets, 1.0)):.2f} | {fitted} | "
              f"{math.exp(loss_at(test_logits, test.targets, fitted)):.2f}", flush=True)


if __name__ == "__main__":
    main()
