"""Why an assembled model learns or not: `peerd sim` rounds with extra figures per evaluation.

Usage: python scripts/diagnose_assembly.py OUT.jsonl [--task fmnist] [--method msfusion]
           [--peers 8] [--mu 0.25] [--seed 0] [--rounds 30] [--every 5] [--drift-period R]
           [--drift-rates rank|colour]
           [--topology ring] [--layout ring|rotating|scattered] [--lr LR] [--steps N]
           [--batch-size B] [--partition dirichlet:0.5] [--contrastive] [--balanced-softmax]
           [--test-samples 2000] [--eval-samples N] [--whole-groups NAME[,NAME...]]

8 peers unless `--peers`, Dirichlet 0.5 unless `--partition`, the task's local training unless
overridden. Every
`--every` rounds it prints and appends one JSON line: the assembled model's accuracy (what
`peerd sim` reports as global_acc), the plain mean of all peers' full parameter copies, peer 0's
own copy, each peer's sub-model on the global test set (mean and max), the fraction of entries
some peer holds this round, coverage so far, and how far the peers' copies have drifted apart
(the norm of the per-entry standard deviation across peers) next to the norm of their mean. Test
accuracy is on the first 2000 test samples.

Coherence (issue 23): the losses of the assembled model and of the peers' sub-models on the
global test set; the fraction of weight entries held by exactly one peer and by two or more
this round (a unit has 2 holders at mu 0.25 on 8 peers, but an entry of a weight joining two
groups is held only where both of a peer's windows meet); the assembled model restricted to
the entries some peer held in the last k rounds (k = 1, 8; the rest set to zero); and the
median rounds since an entry was last held.

For a text task also the assembled model's loss on the first `--eval-samples` test samples
(default: the task's own, what `peerd cluster` reports as global_ppl), beside the loss on the
`--test-samples` above: how much of a perplexity curve is the choice of evaluation samples; and
the logit temperature T (logits / T) at which the assembled model's loss on the `--test-samples`
is lowest, with that loss: how much of it is a wrong scale of the logits rather than wrong
predictions (the tied LM head's input scale is sqrt(K / k) in a sub-model, docs/ALGORITHM.md,
Scaling, so windows that agree sum to logits sqrt(K / k) times sharper than each peer's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from peerd.algorithm.aggregate import assemble
from peerd.algorithm.evaluate import Evaluation, evaluate
from peerd.algorithm.plan import LAYOUTS, RING_LAYOUT
from peerd.algorithm.submodel import Params, entry_mask, extract
from peerd.config import (
    DEFAULT_DRIFT_RATES,
    DRIFT_PERIOD,
    DRIFT_RATES,
    SimConfig,
    parse_whole_groups_text,
)
from peerd.data import Split
from peerd.metrics import global_test_set
from peerd.models.base import Plan, full_plan
from peerd.sim import build, run_round
from peerd.tasks import get_task

TEST_SAMPLES = 2000
TEMPERATURES = tuple(1 + 0.25 * step for step in range(9))  # 1 to 3


@torch.no_grad()
def best_temperature(module: torch.nn.Module, split: Split) -> tuple[float, float]:
    """(T, loss) of the logit temperature in TEMPERATURES with the lowest mean token loss."""
    module.eval()
    logits = torch.cat([module(split.inputs[start:start + 256])
                        for start in range(0, len(split), 256)])
    losses = {t: float(F.cross_entropy((logits / t).flatten(0, 1), split.targets.flatten()))
              for t in TEMPERATURES}
    best = min(losses, key=losses.__getitem__)
    return best, losses[best]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--task", default="fmnist")
    parser.add_argument("--method", default="msfusion")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--mu", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--drift-period", type=int, default=DRIFT_PERIOD)
    parser.add_argument("--drift-rates", default=DEFAULT_DRIFT_RATES, choices=DRIFT_RATES)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--layout", default=RING_LAYOUT, choices=LAYOUTS)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--contrastive", action="store_true")
    parser.add_argument("--balanced-softmax", action="store_true")
    parser.add_argument("--test-samples", type=int, default=TEST_SAMPLES)
    parser.add_argument("--eval-samples", type=int)
    parser.add_argument("--whole-groups", type=parse_whole_groups_text,
                        help="msfusion: unit groups every peer keeps whole (e.g. embd)")
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    task = get_task(args.task)
    train = task.train
    if args.lr is not None:
        train = dataclasses.replace(train, lr=args.lr)
    if args.steps is not None:
        train = dataclasses.replace(train, max_local_steps=args.steps)
    if args.batch_size is not None:
        train = dataclasses.replace(train, batch_size=args.batch_size)
    train = dataclasses.replace(train, contrastive=args.contrastive,
                                balanced_softmax=args.balanced_softmax)
    sim = build(SimConfig(
        peers=args.peers, method=args.method, mu=(args.mu,), task=args.task, rounds=args.rounds,
        seed=args.seed, partition=args.partition, out="/tmp/diagnose-assembly",
        drift_period=args.drift_period, drift_rates=args.drift_rates, layout=args.layout,
        topology=args.topology, contrastive=args.contrastive, whole_groups=args.whole_groups,
        train=train))
    spec = sim.spec
    test = sim.data.test.subset(np.arange(min(args.test_samples, len(sim.data.test))))
    cluster_test = global_test_set(sim.data, args.eval_samples or task.eval_samples)

    def scored(params: Params, plan: Plan | None = None) -> Evaluation:
        module = extract(spec, params, plan if plan is not None else full_plan(spec))
        return evaluate(module, spec.kind, test)

    def accuracy(params: Params, plan: Plan | None = None) -> float:
        return scored(params, plan).accuracy

    last_held = {name: torch.full(t.shape, -1) for name, t in sim.engines[0].params.items()}

    started = time.monotonic()
    with args.out.open("w") as log:
        for round_index in range(args.rounds):
            contexts, stats = run_round(sim, round_index)
            plans = contexts[0].plans_now
            holders = {name: sum(entry_mask(spec, plan, name, t.shape).int()
                                 for plan in plans.values())
                       for name, t in last_held.items()}
            for name, count in holders.items():
                last_held[name][count > 0] = round_index
            if (round_index + 1) % args.every:
                continue
            copies = {engine.peer_id: engine.params for engine in sim.engines}
            stacked = {name: torch.stack([c[name] for c in copies.values()])
                       for name in sim.engines[0].params}
            mean = {name: tensor.mean(0) for name, tensor in stacked.items()}
            held = total = 0
            for name, tensor in mean.items():
                mask = torch.zeros(tensor.shape, dtype=torch.bool)
                for plan in plans.values():
                    mask |= entry_mask(spec, plan, name, tensor.shape)
                held += int(mask.sum())
                total += tensor.numel()
            subs = [scored(e.params, plans[e.peer_id]) for e in sim.engines]
            assembled = assemble(spec, copies, plans)
            whole = scored(assembled)
            entries = sum(t.numel() for t in holders.values())

            def restricted(k: int, now: int = round_index, model: Params = assembled) -> float:
                return accuracy({name: torch.where(last_held[name] > now - k, t,
                                                   torch.zeros_like(t))
                                 for name, t in model.items()})

            age = torch.cat([(round_index - t).reshape(-1).float() for t in last_held.values()])
            record = {
                "round": round_index + 1,
                "train_loss": statistics.fmean(s.loss for s in stats),
                "assembled": whole.accuracy,  # what peerd sim reports as global_acc
                "mean_of_copies": accuracy(mean),
                "peer0_copy": accuracy(sim.engines[0].params),
                "sub_global_mean": statistics.fmean(e.accuracy for e in subs),
                "sub_global_max": max(e.accuracy for e in subs),
                "assembled_loss": whole.loss,
                "sub_global_loss_mean": statistics.fmean(e.loss for e in subs),
                "entries_one_holder": sum(int((c == 1).sum()) for c in holders.values())
                / entries,
                "entries_two_plus": sum(int((c >= 2).sum()) for c in holders.values())
                / entries,
                "assembled_recent_1": restricted(1),
                "assembled_recent_8": restricted(8),
                "entry_age_median": float(age[age <= round_index].median()),
                "held_fraction": held / total,
                "coverage": sim.coverage.fraction,
                "copy_spread": float(sum(t.std(0).pow(2).sum() for t in stacked.values()) ** 0.5),
                "norm": float(sum(t.pow(2).sum() for t in mean.values()) ** 0.5),
                "wall_s": time.monotonic() - started,
            }
            if spec.kind == "text":
                record["assembled_loss_cluster_eval"] = evaluate(
                    extract(spec, assembled, full_plan(spec)), spec.kind, cluster_test).loss
                record["assembled_temperature"], record["assembled_loss_at_temperature"] = (
                    best_temperature(extract(spec, assembled, full_plan(spec)), test))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in record.items()}), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()


if __name__ == "__main__":
    main()
