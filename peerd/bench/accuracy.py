"""`peerd bench accuracy`: MSfusion's claims side by side with the baselines, by `peerd sim`.

Every run is one `peerd sim` (peerd/sim.py) of the chosen task, each peer's mean shard
`--shard-size` samples (the training set is cut to peers x shard_size), `--steps` local SGD
steps a round. Shards are drawn by Dirichlet label skew (alpha 0.5) on the image tasks and by
whole books (`natural`) on kjv. Image tasks are scored by accuracy (higher is better), kjv by
perplexity (lower is better): the target, the final figures and the curves use the task's
metric. Runs are keyed by what defines them and kept under OUT/runs/KEY/ (metrics.jsonl and
the config that produced them); `--reuse` skips a run whose stored config matches and whose
metrics hold every round (peerd/bench/stored.py).
The tables (issue 3):

- sizing: the full-width and the quarter-width model trained centrally (one peer, all the
  cluster's data and steps): the benchmark means something only if the full width wins.
  `own` is the trained model itself on its held-out tenth of the data (`final`, the assembled
  full-width model, is meaningless for a static quarter: 3/4 of it never trains).
- a: per-peer training FLOPs to the target (cumulative training FLOPs of the mean peer until
  the assembled model's metric first reaches `--target`), and the final metric.
- b: scalability, msfusion at mu 0.25, N = 4, 8, 16, the same shard size per peer.
- c: ablation of the contrastive term and the overlap schedule (msfusion mu 0.25).
- d: ring against fully connected: the final metric and bytes sent per peer per round.
- e: msfusion at mu 0.25 against `full` at equal rounds (equal per-peer compute with
  `--budget-gflops`).
- f: small width at equal per-peer compute (issue 23): msfusion at mu 0.25 and 0.5, heterofl,
  fedrolex and fd at mu 0.25, each judged by what it delivers.

What a method delivers: msfusion, fedrolex and full hand over the assembled full model;
heterofl and fd at one width never train the rest of it, so they hand over their shared
sub-model, scored on the global test set (`peer_global_*` in metrics.jsonl). The tables give
the delivered figure, which one it is, and both beside it; the target and the curves use the
delivered figure.

`--budget-gflops G` (issue 23): every row trains until its mean peer's cumulative training
FLOPs reach G (its rounds follow from its own cost per round, rounds_for_budget), so rows of
different widths get the same per-peer compute; 3 seeds unless --seeds says otherwise.

Figures are medians over seeds with the spread (min..max). msfusion rows without an explicit
choice use peerd's defaults for the contrastive term and the overlap schedule. The contrastive
term's two frozen forwards are part of its FLOPs (peerd/algorithm/engine.py TrainStats).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from peerd.algorithm.engine import TrainStats
from peerd.algorithm.losses import ModelContrastive
from peerd.algorithm.submodel import forward_flops_per_sample
from peerd.bench.processes import partition_arg, positive_int, seeds_arg
from peerd.bench.stored import run_or_reuse, spread
from peerd.config import (
    DEFAULT_DRIFT_RATES,
    DRIFT_PERIOD,
    DRIFT_RATES,
    STATIC_OVERLAP,
    ConfigError,
    SimConfig,
    TrainConfig,
    parse_whole_groups_text,
)
from peerd.models.base import plan_units
from peerd.ops.plots import plot_series
from peerd.scoring import TASK_SCORING, Metric, deliverable
from peerd.sim import build
from peerd.tasks import get_task

TABLES = ("sizing", "a", "b", "c", "d", "e", "f")
BUDGET_SEEDS = 3


HEADLINE_MU = 0.25
ADAPTIVE_OVERLAP = "decay:5"  # the schedule the ablation sets against a static overlap
BASELINES = ("fedrolex", "heterofl", "fd")
BASELINE_MUS = (0.125, 0.25, 0.5)
MSFUSION_MUS = (0.125, 0.25, 0.5)
SCALE_PEERS = (4, 8, 16)


@dataclass(frozen=True)
class Settings:
    """What every run of one benchmark shares."""

    task: str
    rounds: int
    steps: int
    shard_size: int
    peers: int
    partition: str
    eval_every: int
    eval_samples: int
    target: float
    budget_gflops: float | None = None  # None: every row trains `rounds` rounds
    balanced_softmax: bool = False  # every row's local loss (TrainConfig.balanced_softmax)
    drift_period: int = DRIFT_PERIOD  # msfusion rows' SimConfig.drift_period
    whole_groups: str | None = None  # msfusion rows' SimConfig.whole_groups
    drift_rates: str = DEFAULT_DRIFT_RATES  # msfusion rows' SimConfig.drift_rates

    @property
    def metric(self) -> Metric:
        return TASK_SCORING[self.task].metric


@dataclass(frozen=True)
class RunSpec:
    method: str
    mu: float
    peers: int
    seed: int
    topology: str = "ring"
    contrastive: bool = TrainConfig().contrastive
    overlap: str = SimConfig().overlap
    central: bool = False  # one peer with the whole cluster's data and steps

    @property
    def key(self) -> str:
        parts = [self.method, f"mu{self.mu}", f"n{self.peers}", self.topology,
                 "con" if self.contrastive else "nocon", self.overlap.replace(":", ""),
                 f"s{self.seed}"]
        return "-".join(parts + (["central"] if self.central else []))

    def sim_config(self, settings: Settings, out: Path) -> SimConfig:
        task_train = get_task(settings.task).train
        peers, steps = (1, settings.steps * self.peers) if self.central else (
            self.peers, settings.steps)
        train = replace(task_train, max_local_steps=steps, contrastive=self.contrastive,
                        balanced_softmax=settings.balanced_softmax)
        config = SimConfig(
            peers=peers, topology=self.topology, method=self.method, mu=(self.mu,),
            task=settings.task, rounds=settings.rounds, seed=self.seed,
            partition="iid" if self.central else settings.partition, out=str(out),
            eval_every=settings.eval_every, eval_samples=settings.eval_samples, train=train,
            overlap=self.overlap, contrastive=self.contrastive,
            shard_size=settings.shard_size * self.peers // peers,
            # Only msfusion's windows drift: the other rows stay one run whatever the period.
            drift_period=settings.drift_period if self.method == "msfusion" else DRIFT_PERIOD,
            whole_groups=settings.whole_groups if self.method == "msfusion" else None,
            drift_rates=(settings.drift_rates if self.method == "msfusion"
                         else DEFAULT_DRIFT_RATES),
        )
        if settings.budget_gflops is None:
            return config
        return replace(config, rounds=rounds_for_budget(config, settings.budget_gflops * 1e9))


def samples_per_round(shard: int, train: TrainConfig) -> int:
    """Samples one peer's local training visits in a round (Engine.train: `local_epochs`
    passes over the shard in batches, at most `max_local_steps` batches in all)."""
    batches = [min(train.batch_size, shard - start)
               for start in range(0, shard, train.batch_size)] * train.local_epochs
    steps = len(batches) if train.max_local_steps is None else train.max_local_steps
    return sum(batches[:steps])


def rounds_for_budget(config: SimConfig, budget_flops: float) -> int:
    """The rounds after which the mean peer's cumulative training FLOPs (`peerd sim`'s
    train_flops_cum_peer_mean) first reach `budget_flops`, from each peer's sub-model and
    shard: the same count `peerd sim` then reports. The contrastive term's frozen forwards
    start in a peer's second round."""
    sim = build(config)
    plans = sim.engines[0].begin_round(0, sim.members).plans_now
    costs = [(forward_flops_per_sample(sim.spec, plan_units(plans[engine.peer_id])),
              samples_per_round(len(engine.train_split), config.train))
             for engine in sim.engines]

    def round_flops(round_index: int) -> float:
        frozen = (ModelContrastive.frozen_forwards
                  if config.train.contrastive and round_index > 0 else 0)
        return statistics.fmean(
            TrainStats(0.0, samples, 0, forward, frozen).train_flops
            for forward, samples in costs)

    rounds, spent = 0, 0.0
    while spent < budget_flops:
        spent += round_flops(rounds)
        rounds += 1
    return rounds


@dataclass(frozen=True)
class RunSummary:
    """One run in the task's metric (accuracy or perplexity)."""

    spec: RunSpec
    rounds: int
    final: float  # the assembled full-width model on the global test set
    final_own: float  # each peer's own (sub-)model on its held-out split, mean
    # each peer's own (sub-)model on the global test set, mean (None: a run stored before
    # metrics.jsonl carried it)
    final_sub_models: float | None
    delivers: str  # deliverable(method)
    delivered: float | None  # `final` or `final_sub_models`, whichever the method delivers
    flops_to_target: float | None  # per peer, by the delivered figure; None: never reached
    round_to_target: int | None
    flops_per_sample_peer: float
    flops_per_sample_full: float
    bytes_per_round_peer: float
    coverage: float
    curve: tuple[tuple[float, float], ...]  # (cumulative per-peer FLOPs, delivered metric)


def summarize(spec: RunSpec, records: Sequence[dict], metric: Metric, target: float
              ) -> RunSummary:
    evaluated = [r for r in records if r["global_acc"] is not None]
    delivers = deliverable(spec.method)
    delivered_key = metric.peer_global_key if delivers == "sub-model" else metric.global_key
    curve = tuple((r["train_flops_cum_peer_mean"], r[delivered_key]) for r in evaluated
                  if r.get(delivered_key) is not None)
    reached = next((r for r in evaluated if r.get(delivered_key) is not None
                    and metric.reached(r[delivered_key], target)), None)
    return RunSummary(
        spec=spec,
        rounds=records[-1]["round"],
        final=evaluated[-1][metric.global_key],
        final_own=evaluated[-1][metric.peer_key],
        final_sub_models=evaluated[-1].get(metric.peer_global_key),
        delivers=delivers,
        delivered=evaluated[-1].get(delivered_key),
        flops_to_target=None if reached is None else reached["train_flops_cum_peer_mean"],
        round_to_target=None if reached is None else reached["round"],
        flops_per_sample_peer=records[-1]["flops_per_sample_peer_mean"],
        flops_per_sample_full=records[-1]["flops_per_sample_full"],
        bytes_per_round_peer=statistics.fmean(r["bytes_sent_peer_mean"] for r in records),
        coverage=records[-1]["coverage"],
        curve=curve,
    )


def run_spec(spec: RunSpec, settings: Settings, out: Path, reuse: bool,
             log: Callable[[str], None]) -> RunSummary:
    key = spec.key + ("-balanced" if settings.balanced_softmax else "")
    if spec.method == "msfusion" and settings.drift_period != DRIFT_PERIOD:
        key += f"-r{settings.drift_period}"
    if spec.method == "msfusion" and settings.whole_groups is not None:
        key += "-whole-" + settings.whole_groups.replace(",", "+")
    if spec.method == "msfusion" and settings.drift_rates != DEFAULT_DRIFT_RATES:
        key += f"-{settings.drift_rates}"
    records = run_or_reuse(spec.sim_config(settings, out / "runs" / key), reuse, log)
    return summarize(spec, records, settings.metric, settings.target)


# ---- which runs each table needs ---------------------------------------------------------------


def table_specs(table: str, settings: Settings, seeds: Sequence[int]) -> dict[str, list[RunSpec]]:
    """Row label -> one run per seed."""
    n = settings.peers

    def rows(pairs: Iterable[tuple[str, RunSpec]]) -> dict[str, list[RunSpec]]:
        return {label: [replace(spec, seed=seed) for seed in seeds] for label, spec in pairs}

    if table == "sizing":
        return rows([("full width (central)", RunSpec("full", 1.0, n, 0, central=True)),
                     ("quarter width (central)",
                      RunSpec("heterofl", HEADLINE_MU, n, 0, central=True))])
    if table == "a":
        pairs = [(f"msfusion mu {mu}", RunSpec("msfusion", mu, n, 0)) for mu in MSFUSION_MUS]
        pairs += [(f"{method} mu {mu}", RunSpec(method, mu, n, 0))
                  for method in BASELINES for mu in BASELINE_MUS]
        return rows([*pairs, ("full", RunSpec("full", 1.0, n, 0))])
    if table == "b":
        return rows([(f"msfusion mu {HEADLINE_MU} N={peers}",
                      RunSpec("msfusion", HEADLINE_MU, peers, 0)) for peers in SCALE_PEERS])
    if table == "c":
        return rows([
            (f"contrastive {'on' if on else 'off'}, overlap {overlap}",
             RunSpec("msfusion", HEADLINE_MU, n, 0, contrastive=on, overlap=overlap))
            for on in (True, False) for overlap in (ADAPTIVE_OVERLAP, STATIC_OVERLAP)])
    if table == "d":
        return rows([(f"msfusion mu {HEADLINE_MU} {topology}",
                      RunSpec("msfusion", HEADLINE_MU, n, 0, topology=topology))
                     for topology in ("ring", "full")])
    if table == "e":
        return rows([(f"msfusion mu {HEADLINE_MU}", RunSpec("msfusion", HEADLINE_MU, n, 0)),
                     ("full", RunSpec("full", 1.0, n, 0))])
    if table == "f":
        return rows([(f"msfusion mu {mu}", RunSpec("msfusion", mu, n, 0))
                     for mu in (HEADLINE_MU, 0.5)]
                    + [(f"{method} mu {HEADLINE_MU}", RunSpec(method, HEADLINE_MU, n, 0))
                       for method in BASELINES])
    raise ValueError(f"unknown table {table!r}; choose from {', '.join(TABLES)}")


# ---- figures -----------------------------------------------------------------------------------


def _spread_known(values: Sequence[float | None]) -> dict[str, float] | None:
    """The spread of the values, or None where a stored run predates the figure."""
    return None if any(v is None for v in values) else spread(values)


def row_figures(runs: Sequence[RunSummary]) -> dict[str, object]:
    reached = [r.flops_to_target for r in runs if r.flops_to_target is not None]
    return {
        "seeds": [r.spec.seed for r in runs],
        "rounds": spread([r.rounds for r in runs]),
        "delivers": runs[0].delivers,
        "delivered": _spread_known([r.delivered for r in runs]),
        "final": spread([r.final for r in runs]),
        "own": spread([r.final_own for r in runs]),
        "sub_models": _spread_known([r.final_sub_models for r in runs]),
        # Median over the seeds that reached the target; how many did is given beside it.
        "flops_to_target": spread(reached) if reached else None,
        "reached": len(reached),
        "flops_per_sample_peer": runs[0].flops_per_sample_peer,
        "flops_per_sample_full": runs[0].flops_per_sample_full,
        "bytes_per_round_peer": spread([r.bytes_per_round_peer for r in runs]),
        "coverage": min(r.coverage for r in runs),
    }


def _cell(spread: dict[str, float] | None, scale: float = 1.0, digits: int = 3,
          missing: str = "not reached") -> str:
    if spread is None:
        return missing
    median, low, high = (spread[k] / scale for k in ("median", "min", "max"))
    if low == high:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({low:.{digits}f}..{high:.{digits}f})"


# "delivered", "final" (the assembled model), "own" (each peer's model on its own split) and
# "sub-models" (each peer's model on the global test set) are headed with the task's metric.
METRIC_COLUMNS = ("delivered", "final", "own", "sub-models")
COLUMNS = {
    # The quarter-width model's own figure is what sizing asks; the assembled full-width
    # model of a static prefix holds untrained entries.
    "sizing": ("own", "final"),
    "a": ("MFLOPs/sample", "rounds", "delivers", "per-peer GFLOPs to target", "reached",
          "delivered", "final", "sub-models"),
    "b": ("per-peer GFLOPs to target", "reached", "final", "sub-models"),
    "c": ("final", "per-peer GFLOPs to target"),
    "d": ("final", "KiB sent per peer per round"),
    "e": ("final", "own", "sub-models", "rounds"),
    "f": ("MFLOPs/sample", "rounds", "delivers", "delivered", "final", "sub-models",
          "per-peer GFLOPs to target", "reached"),
}


def _header(name: str, metric: Metric) -> str:
    return f"{name} {metric.short}" if name in METRIC_COLUMNS else name


def _column(name: str, row: dict, seeds: int) -> str:
    if name in METRIC_COLUMNS:
        return _cell(row[name.replace("-", "_")], missing="n/a")
    if name == "delivers":
        return row["delivers"]
    if name == "rounds":
        return _cell(row["rounds"], digits=0)
    if name == "MFLOPs/sample":
        return f"{row['flops_per_sample_peer'] / 1e6:.2f}"
    if name == "per-peer GFLOPs to target":
        return _cell(row["flops_to_target"], 1e9, 1)
    if name == "reached":
        return f"{row['reached']}/{seeds}"
    return _cell(row["bytes_per_round_peer"], 1024, 1)


def markdown_table(table: str, rows: dict[str, dict], metric: Metric) -> str:
    columns = COLUMNS[table]
    lines = ["| row | " + " | ".join(_header(name, metric) for name in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for label, row in rows.items():
        cells = [_column(name, row, len(row["seeds"])) for name in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the benchmark -----------------------------------------------------------------------------


def run_accuracy(
    settings: Settings, tables: Sequence[str], seeds: Sequence[int], out: Path, reuse: bool,
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    """Runs what the tables need (each distinct run once), writes OUT/accuracy.json,
    OUT/accuracy.md and OUT/accuracy-*.png; returns the JSON object."""
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, RunSummary] = {}
    results: dict[str, dict[str, dict]] = {}
    length = (f"{settings.rounds} rounds" if settings.budget_gflops is None else
              f"{settings.budget_gflops:g} GFLOPs of training per peer (rounds follow)")
    whole = ("" if settings.whole_groups is None else
             f"msfusion keeps {settings.whole_groups} whole, ")
    markdown = [f"task {settings.task}, {settings.peers} peers ({settings.partition}), "
                f"{length} x {settings.steps} steps, shard {settings.shard_size}, "
                f"drift period {settings.drift_period} ({settings.drift_rates} rates), {whole}"
                f"target {settings.target}, seeds {', '.join(map(str, seeds))}; delivered: "
                "the assembled model, or for heterofl and fd the shared sub-model on the test set"]
    for table in tables:
        rows: dict[str, dict] = {}
        for label, specs in table_specs(table, settings, seeds).items():
            for spec in specs:
                if spec.key not in summaries:
                    summaries[spec.key] = run_spec(spec, settings, out, reuse, log)
            rows[label] = row_figures([summaries[spec.key] for spec in specs])
        results[table] = rows
        markdown += ["", f"### table {table}", "", markdown_table(table, rows, settings.metric)]
        _plot(table, rows, {label: summaries[specs[0].key] for label, specs in
                            table_specs(table, settings, seeds).items()}, settings, out)
    document = {"settings": asdict(settings), "metric": settings.metric.name,
                "seeds": list(seeds), "tables": results,
                "runs": {key: {**asdict(s), "spec": asdict(s.spec)}
                         for key, s in summaries.items()}}
    (out / "accuracy.json").write_text(json.dumps(document, indent=1))
    (out / "accuracy.md").write_text("\n".join(markdown) + "\n")
    return document


def _plot(table: str, rows: dict[str, dict], first_seed: dict[str, RunSummary],
          settings: Settings, out: Path) -> None:
    """a, c, d, e, f: the delivered metric against per-peer FLOPs (first seed); b: FLOPs to
    target against N."""
    title = f"{settings.task}: table {table}"
    if table == "b":
        points = [(float(s.spec.peers), rows[label]["flops_to_target"]["median"] / 1e9)
                  for label, s in first_seed.items() if rows[label]["flops_to_target"]]
        plot_series({"msfusion mu 0.25": points}, out / "accuracy-b.png", title, "peers N",
                    "per-peer GFLOPs to target")
    elif table != "sizing":  # central runs of two widths: nothing to compare on a curve
        series = {label: [(flops / 1e9, acc) for flops, acc in s.curve]
                  for label, s in first_seed.items()}
        plot_series(series, out / f"accuracy-{table}.png", title,
                    "cumulative training GFLOPs per peer",
                    f"delivered {settings.metric.name} (heterofl, fd: sub-model)", log_x=True)


# ---- command line ------------------------------------------------------------------------------


def _tables(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [t for t in chosen if t not in TABLES]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(
            f"tables={text!r} is invalid: choose from {', '.join(TABLES)} (comma list)")
    return chosen


def _positive_number(option: str, what: str) -> Callable[[str], float]:
    """An argument type: a finite positive number, named by its option when it is not."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{option}={text!r} is invalid: must be {what}")
        return value
    return parse


# The task's metric bounds a target further (Metric.check_target).
_target = _positive_number("target", "a positive number")
_budget = _positive_number("budget-gflops", "a positive number of GFLOPs")


def _whole_groups(text: str) -> str:
    try:
        return parse_whole_groups_text(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


QUICK = {"rounds": 2, "steps": 1, "shard_size": 24, "eval_every": 1, "eval_samples": 60}


def add_accuracy_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `accuracy` (under `peerd bench`)."""
    accuracy = subparsers.add_parser(
        "accuracy", help="msfusion against the baselines: compute to target, scale, ablation",
        description="Run the issue-3 tables with `peerd sim` and write accuracy.json, "
                    "accuracy.md and accuracy-*.png to --out.")
    accuracy.add_argument("--task", choices=sorted(TASK_SCORING), default="fmnist")
    accuracy.add_argument("--tables", type=_tables, default=TABLES,
                          help="comma list of " + ", ".join(TABLES) + " (default: all)")
    accuracy.add_argument("--seeds", type=seeds_arg, default=None, metavar="S[,S...]",
                          help="seeds of every row (default: 0,1; with --budget-gflops 0,1,2)")
    accuracy.add_argument("--rounds", type=positive_int, default=None,
                          help="rounds per run (default: 30; --quick: 2)")
    accuracy.add_argument("--steps", type=positive_int, default=None,
                          help="local SGD steps per round (default: 20; --quick: 1)")
    accuracy.add_argument("--shard-size", type=positive_int, default=None,
                          help="mean training samples per peer (default: 1000; --quick: 24)")
    accuracy.add_argument("--peers", type=positive_int, default=8,
                          help="peers of every table but b (default: %(default)s)")
    accuracy.add_argument("--partition", type=partition_arg, default=None,
                          help="how shards are drawn (default: dirichlet:0.5; kjv: natural)")
    accuracy.add_argument("--eval-every", type=positive_int, default=None,
                          help="evaluate the assembled model every K rounds (default: 1)")
    accuracy.add_argument("--eval-samples", type=positive_int, default=None,
                          help="test samples per evaluation (default: 1000; --quick: 60)")
    accuracy.add_argument("--target", type=_target, default=None,
                          help="target accuracy, or perplexity on kjv (default: fmnist 0.7, "
                               "digits 0.8, kjv perplexity 8)")
    accuracy.add_argument("--budget-gflops", type=_budget, default=None, metavar="G",
                          help="train every row until its per-peer training FLOPs reach G "
                               "GFLOPs (equal compute; rounds follow; seeds 0,1,2 unless "
                               "--seeds; excludes --rounds)")
    accuracy.add_argument("--balanced-softmax", action="store_true",
                          help="every row trains with the balanced softmax (the peer's label "
                               "prior taken out of its logits; not with table c's contrastive "
                               "rows)")
    accuracy.add_argument("--drift-period", type=positive_int, default=DRIFT_PERIOD,
                          metavar="R",
                          help="msfusion rows: rounds in which the first unit group's windows "
                               "drift once around (default: %(default)s)")
    accuracy.add_argument("--whole-groups", type=_whole_groups, default=None,
                          metavar="NAME[,NAME...]",
                          help="msfusion rows: unit groups every peer keeps whole, not "
                               "windowed (e.g. embd on kjv; default: none)")
    accuracy.add_argument("--drift-rates", choices=DRIFT_RATES, default=DEFAULT_DRIFT_RATES,
                          help="msfusion rows: each group's turns per drift period, by rank or "
                               "by colour (default: %(default)s)")
    accuracy.add_argument("--threads", type=positive_int, default=1,
                          help="torch threads (default: %(default)s)")
    accuracy.add_argument("--quick", action="store_true",
                          help="a smoke run: 2 rounds of 1 step on 24 samples per peer")
    accuracy.add_argument("--reuse", action="store_true",
                          help="skip runs stored under OUT/runs with the same config and every "
                               "round")
    accuracy.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    accuracy.set_defaults(func=run_accuracy_command)


def settings_from(args: argparse.Namespace) -> Settings:
    defaults = QUICK if args.quick else {"rounds": 30, "steps": 20, "shard_size": 1000,
                                         "eval_every": 1, "eval_samples": 1000}

    def pick(name: str) -> int:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    scoring = TASK_SCORING[args.task]
    target = scoring.target if args.target is None else args.target
    scoring.metric.check_target(target)
    if args.budget_gflops is not None and args.rounds is not None:
        raise ConfigError("--rounds and --budget-gflops exclude each other: with a budget "
                          "each row's rounds follow from its cost")
    return Settings(
        task=args.task, rounds=pick("rounds"), steps=pick("steps"),
        shard_size=pick("shard_size"), peers=args.peers,
        partition=scoring.partition if args.partition is None else args.partition,
        eval_every=pick("eval_every"), eval_samples=pick("eval_samples"), target=target,
        budget_gflops=args.budget_gflops, balanced_softmax=args.balanced_softmax,
        drift_period=args.drift_period, drift_rates=args.drift_rates,
        whole_groups=args.whole_groups,
    )


def seeds_from(args: argparse.Namespace) -> tuple[int, ...]:
    """--seeds, or the default: two seeds, three under a budget (median and range of three;
    one process per seed, then a re-cut of all three with --reuse, also works)."""
    if args.seeds is not None:
        return args.seeds
    return tuple(range(BUDGET_SEEDS if args.budget_gflops is not None else 2))


def run_accuracy_command(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    run_accuracy(settings_from(args), args.tables, seeds_from(args), args.out, args.reuse)
    print((args.out / "accuracy.md").read_text())
    return 0
