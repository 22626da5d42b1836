"""The per-round metrics record shared by `peerd sim` and `peerd cluster`, and the evaluation
of the assembled full model."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from peerd.algorithm.aggregate import Assembly
from peerd.algorithm.batchnorm import calibration_inputs, recompute_batchnorm
from peerd.algorithm.evaluate import Evaluation, evaluate
from peerd.algorithm.submodel import Params, extract
from peerd.data import Split, TaskData
from peerd.global_model import save_global_model
from peerd.models.base import ModelSpec, Plan, full_plan
from peerd.ops.plots import plot_curves


@dataclass(frozen=True)
class PeerRound:
    """One peer's figures after a round."""

    train_loss: float
    forward_flops_per_sample: int
    train_flops_cum: int
    bytes_sent_cum: int


def evaluate_global(
    spec: ModelSpec, data: TaskData, peer_params: Mapping[str, Params],
    plans: Mapping[str, Plan], eval_samples: int | None,
) -> tuple[dict[str, float], nn.Module]:
    """`GlobalEvaluation` of every peer's parameters at once (the simulator holds them all)."""
    evaluation = GlobalEvaluation(spec, data, eval_samples)
    for peer_id, params in peer_params.items():
        evaluation.add(params, plans[peer_id])
    return evaluation.result()


class GlobalEvaluation:
    """On the held-out test set (first `eval_samples`): the assembled full-width model
    (`global_*`) and every peer's own sub-model of the round, averaged over peers
    (`peer_global_*`). The second is what a method hands a peer: for heterofl and fd at one
    width, the shared sub-model, whose untrained rest makes the assembled model meaningless.
    BatchNorm statistics are recomputed for every model scored (peerd/algorithm/batchnorm.py).

    Peers are added one at a time (their sub-model scored, their values summed into the
    assembly), so a caller that pulls them one after the other (`peerd cluster`) holds one
    peer's parameters at a time, not every peer's."""

    def __init__(self, spec: ModelSpec, data: TaskData, eval_samples: int | None) -> None:
        self.spec = spec
        self.test = global_test_set(data, eval_samples)
        self.calibration = calibration_inputs(data.train.inputs)
        self.assembly = Assembly(spec)
        self.own: list[Evaluation] = []

    def add(self, params: Params, plan: Plan) -> None:
        self.assembly.add(params, plan)
        own = _calibrated(extract(self.spec, params, plan), self.calibration)
        self.own.append(evaluate(own, self.spec.kind, self.test))

    def result(self) -> tuple[dict[str, float], nn.Module]:
        """The figures and the assembled model they score (what `peerd export` hands out)."""
        spec = self.spec
        assembled = assembled_model(spec, self.calibration, self.assembly.result())
        result = evaluate(assembled, spec.kind, self.test)
        figures = {"global_acc": result.accuracy, "global_loss": result.loss}
        if spec.kind == "text":
            figures["global_ppl"] = result.perplexity
        figures["peer_global_acc_mean"] = statistics.fmean(e.accuracy for e in self.own)
        figures["peer_global_loss_mean"] = statistics.fmean(e.loss for e in self.own)
        if spec.kind == "text":
            figures["peer_global_ppl_mean"] = statistics.fmean(e.perplexity for e in self.own)
        return figures, assembled


def global_test_set(data: TaskData, eval_samples: int | None) -> Split:
    """The held-out samples the global model is scored on: the first `eval_samples`."""
    if eval_samples is not None and eval_samples < len(data.test):
        return data.test.subset(np.arange(eval_samples))
    return data.test


def assembled_model(spec: ModelSpec, calibration: torch.Tensor, assembled: Params) -> nn.Module:
    """The full-width model of assembled parameters (peerd/algorithm/aggregate.py), BatchNorm
    statistics recomputed on `calibration`: what `global_acc` scores and `peerd export`
    writes."""
    return _calibrated(extract(spec, assembled, full_plan(spec)), calibration)


def _calibrated(module: nn.Module, calibration: torch.Tensor) -> nn.Module:
    recompute_batchnorm(module, calibration)
    return module


def local_figures(spec: ModelSpec, local: Sequence[Evaluation]) -> dict[str, float]:
    """Each peer's sub-model on its own test split, averaged."""
    evaluated = [e for e in local if e.samples]
    figures = {"peer_acc_mean": statistics.fmean(e.accuracy for e in evaluated)}
    if spec.kind == "text":
        figures["peer_ppl_mean"] = statistics.fmean(e.perplexity for e in evaluated)
    return figures


class MetricsLog:
    """Writes OUT/metrics.jsonl, one record per round, OUT/model.safetensors at every
    evaluation, and OUT/curves.png at the end."""

    def __init__(self, out: Path, identity: dict, flops_per_sample_full: int) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.identity = identity  # task, method, topology, peers, mu, seed
        self.flops_full = flops_per_sample_full
        self.records: list[dict] = []
        self._bytes_before: list[int] | None = None
        self._file = open(out / "metrics.jsonl", "w")  # noqa: SIM115 - closed in close()

    def record(
        self, round_number: int, peers: Sequence[PeerRound], coverage: float,
        evaluation: Mapping[str, float | list[float]] | None, wall_s: float,
        model: nn.Module | None = None,
    ) -> dict:
        """`model`: the assembled model `evaluation` scored, saved before the record is
        written, so that the last evaluated record never names a model not yet on disk."""
        if model is not None and evaluation is not None:
            save_global_model(self.out, model, round_number, dict(evaluation),
                              str(self.identity.get("task")))
        sent = [p.bytes_sent_cum for p in peers]
        before = self._bytes_before or [0] * len(peers)
        self._bytes_before = sent
        record = {
            "round": round_number, **self.identity,
            "train_loss_mean": statistics.fmean(p.train_loss for p in peers),
            "flops_per_sample_peer_mean": statistics.fmean(
                p.forward_flops_per_sample for p in peers),
            "flops_per_sample_full": self.flops_full,
            "train_flops_cum_peer_mean": statistics.fmean(p.train_flops_cum for p in peers),
            # by position: mixed-width clusters spend unequal compute per peer
            "train_flops_cum_peer": [p.train_flops_cum for p in peers],
            "bytes_sent_peer_mean": statistics.fmean(
                now - then for now, then in zip(sent, before, strict=True)),
            "bytes_sent_cum_peer_mean": statistics.fmean(sent),
            "coverage": coverage,
            "global_acc": None,
            "peer_acc_mean": None,
            "peer_global_acc_mean": None,
            **(evaluation or {}),
            "wall_s": wall_s,
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.records.append(record)
        return record

    def close(self, title: str | None) -> None:
        """Closes metrics.jsonl; plots curves.png unless `title` is None (no plot wanted)."""
        self._file.close()
        if title is not None:
            plot_curves(self.records, self.out / "curves.png", title)


def run_title(method: str, mu: Sequence[float], task: str, peers: int) -> str:
    return f"{method} mu={','.join(map(str, mu))} {task}, {peers} peers"
