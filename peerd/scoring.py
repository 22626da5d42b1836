"""How a run's assembled model is scored: its metric (accuracy, or perplexity for text) and
each task's default target. Shared by `peerd bench accuracy` and `peerd compare`; no torch, so
that comparing stored runs starts at once."""

from __future__ import annotations

from dataclasses import dataclass

from peerd.config import ConfigError


@dataclass(frozen=True)
class Metric:
    """What a task's tables are scored by, read from `peerd sim`'s per-round records."""

    name: str
    short: str  # in column headers
    global_key: str  # the assembled full-width model
    peer_key: str  # each peer's own (sub-)model on its own split, mean
    peer_global_key: str  # each peer's own (sub-)model on the global test set, mean
    higher_is_better: bool

    def reached(self, value: float, target: float) -> bool:
        return value >= target if self.higher_is_better else value <= target

    def check_target(self, target: float) -> None:
        valid = 0 < target <= 1 if self.higher_is_better else target >= 1
        if not valid:
            bounds = "in (0, 1]" if self.higher_is_better else "at least 1"
            raise ConfigError(f"target={target} is invalid: a target {self.name} must be {bounds}")


ACCURACY = Metric("accuracy", "acc", "global_acc", "peer_acc_mean", "peer_global_acc_mean",
                  higher_is_better=True)
PERPLEXITY = Metric("perplexity", "ppl", "global_ppl", "peer_ppl_mean", "peer_global_ppl_mean",
                    higher_is_better=False)

# At one width these never train the rest of the full model: they deliver their sub-model.
SUB_MODEL_METHODS = ("heterofl", "fd")


def deliverable(method: str) -> str:
    """What a method hands over: "sub-model" (its shared sub-model) or "assembled" (the full
    model assembled from the peers)."""
    return "sub-model" if method in SUB_MODEL_METHODS else "assembled"


@dataclass(frozen=True)
class TaskScoring:
    """How the benchmark scores one task, and its defaults."""

    metric: Metric
    target: float
    partition: str


TASK_SCORING = {
    "fmnist": TaskScoring(ACCURACY, 0.70, "dirichlet:0.5"),
    "digits": TaskScoring(ACCURACY, 0.80, "dirichlet:0.5"),
    "kjv": TaskScoring(PERPLEXITY, 8.0, "natural"),  # whole books per shard
    "kjv-large": TaskScoring(PERPLEXITY, 8.0, "natural"),  # kjv's text, a 104M model
}


def task_metric(task: str) -> Metric:
    """The metric a task is scored by (accuracy for a task this module does not know)."""
    scoring = TASK_SCORING.get(task)
    return ACCURACY if scoring is None else scoring.metric
