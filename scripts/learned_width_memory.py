"""Peak resident memory of unit scoring (peerd/algorithm/width.py) against full-width
training, on kjv.

Usage: python scripts/learned_width_memory.py score|train
`score`: one epoch of unit scoring at mu 0.25 over 20 batches of 32 sequences; `train`: 20 SGD
steps of the full-width model on the same batches. Run each in its own process: the figure is
the process's peak RSS (ru_maxrss) and its rise over the peak after loading data and model.
BENCHMARKS.md, benchmark d (learned width).
"""

from __future__ import annotations

import resource
import sys

import numpy as np
import torch

from peerd.algorithm.engine import sgd, train_step
from peerd.algorithm.submodel import extract, init_params
from peerd.algorithm.width import WidthConfig, unit_scores
from peerd.data import load_task_data
from peerd.models.base import full_plan
from peerd.tasks import BLOCK_SIZE, get_task

BATCHES, BATCH = 20, 32


def peak_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main(mode: str) -> None:
    torch.set_num_threads(1)
    task = get_task("kjv")
    data = load_task_data("kjv", None, block_size=BLOCK_SIZE)
    spec = task.model(data)
    params = init_params(spec, 0)
    split = data.train.subset(np.arange(BATCH * BATCHES))
    loaded = peak_mib()
    if mode == "score":
        unit_scores(spec, params, split, task.train, 0.25, config=WidthConfig(epochs=1))
    elif mode == "train":
        module = extract(spec, params, full_plan(spec))
        optimizer = sgd(module, task.train)
        for start in range(0, len(split), BATCH):
            batch = slice(start, start + BATCH)
            train_step(spec.kind, task.train, module, optimizer, split.inputs[batch],
                       split.targets[batch])
    else:
        raise SystemExit(f"mode {mode!r}: give score or train")
    print(f"{mode}: peak {peak_mib()} MiB, {peak_mib() - loaded} MiB above the loaded peak")


if __name__ == "__main__":
    main(sys.argv[1])
