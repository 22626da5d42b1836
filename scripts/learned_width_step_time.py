"""Seconds per local SGD step (digits, batch 32, one thread) of the uniform sub-model against
the learned one, steps interleaved so that both see the same machine load.

Usage: python scripts/learned_width_step_time.py RUN_DIR
RUN_DIR is a `peerd sim --learned-width` run of the mixed-B cluster (its widths.json);
peer-01 (mu 0.5) and peer-04 (mu 0.25) are timed. BENCHMARKS.md, benchmark d.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from peerd.algorithm.engine import sgd, train_step
from peerd.algorithm.plan import Member, MSFusionPlanner
from peerd.algorithm.submodel import extract, init_params
from peerd.data import load_task_data
from peerd.tasks import get_task

STEPS, WARMUP, BATCH = 200, 20, 32


def main(run_dir: Path) -> None:
    torch.set_num_threads(1)
    task = get_task("digits")
    data = load_task_data("digits", None)
    spec = task.model(data)
    params = init_params(spec, 0)
    learned = json.loads((run_dir / "widths.json").read_text())
    inputs, targets = data.train.inputs[:BATCH], data.train.targets[:BATCH]
    for peer, mu in (("peer-01", 0.5), ("peer-04", 0.25)):
        modules = {}
        for kind, widths in (("uniform", None), ("learned", tuple(learned[peer].items()))):
            plan = MSFusionPlanner(0).plan(0, [Member(peer, mu, None, widths)], spec.groups)
            modules[kind] = extract(spec, params, plan[peer])
        optimizers = {kind: sgd(module, task.train) for kind, module in modules.items()}
        times: dict[str, list[float]] = {kind: [] for kind in modules}
        for _ in range(STEPS):
            for kind, module in modules.items():
                started = time.perf_counter()
                train_step(spec.kind, task.train, module, optimizers[kind], inputs, targets)
                times[kind].append(time.perf_counter() - started)
        for kind, measured in times.items():
            ordered = sorted(measured[WARMUP:])
            print(f"{peer} mu {mu} {kind}: median {1000 * statistics.median(ordered):.1f} ms, "
                  f"p10 {1000 * ordered[len(ordered) // 10]:.1f}, "
                  f"p90 {1000 * ordered[9 * len(ordered) // 10]:.1f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
