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
- e: msfusion at mu 0.25 against `full` at equal rounds.

Figures are medians over seeds with the spread (min..max). msfusion rows without an explicit
choice use peerd's defaults for the contrastive term and the overlap schedule. The contrastive
term's two frozen forwards are part of its FLOPs (peerd/engine.py TrainStats).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from peerd.bench.processes import partition_arg, positive_int, seeds_arg
from peerd.bench.stored import run_or_reuse, spread
from peerd.config import STATIC_OVERLAP, SimConfig, TrainConfig
from peerd.plots import plot_series
from peerd.scoring import TASK_SCORING, Metric
from peerd.tasks import get_task

TABLES = ("sizing", "a", "b", "c", "d", "e")


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
        train = replace(task_train, max_local_steps=steps, contrastive=self.contrastive)
        return SimConfig(
            peers=peers, topology=self.topology, method=self.method, mu=(self.mu,),
            task=settings.task, rounds=settings.rounds, seed=self.seed,
            partition="iid" if self.central else settings.partition, out=str(out),
            eval_every=settings.eval_every, eval_samples=settings.eval_samples, train=train,
            overlap=self.overlap, shard_size=settings.shard_size * self.peers // peers,
        )


@dataclass(frozen=True)
class RunSummary:
    """One run in the task's metric (accuracy or perplexity)."""

    spec: RunSpec
    final: float  # the assembled full-width model on the global test set
    final_own: float  # each peer's own (sub-)model on its held-out split, mean
    flops_to_target: float | None  # per peer; None: never reached
    round_to_target: int | None
    flops_per_sample_peer: float
    flops_per_sample_full: float
    bytes_per_round_peer: float
    coverage: float
    curve: tuple[tuple[float, float], ...]  # (cumulative per-peer FLOPs, global metric)


def summarize(spec: RunSpec, records: Sequence[dict], metric: Metric, target: float
              ) -> RunSummary:
    evaluated = [r for r in records if r["global_acc"] is not None]
    reached = next((r for r in evaluated if metric.reached(r[metric.global_key], target)), None)
    return RunSummary(
        spec=spec,
        final=evaluated[-1][metric.global_key],
        final_own=evaluated[-1][metric.peer_key],
        flops_to_target=None if reached is None else reached["train_flops_cum_peer_mean"],
        round_to_target=None if reached is None else reached["round"],
        flops_per_sample_peer=records[-1]["flops_per_sample_peer_mean"],
        flops_per_sample_full=records[-1]["flops_per_sample_full"],
        bytes_per_round_peer=statistics.fmean(r["bytes_sent_peer_mean"] for r in records),
        coverage=records[-1]["coverage"],
        curve=tuple((r["train_flops_cum_peer_mean"], r[metric.global_key]) for r in evaluated),
    )


def run_spec(spec: RunSpec, settings: Settings, out: Path, reuse: bool,
             log: Callable[[str], None]) -> RunSummary:
    records = run_or_reuse(spec.sim_config(settings, out / "runs" / spec.key), reuse, log)
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
    raise ValueError(f"unknown table {table!r}; choose from {', '.join(TABLES)}")


# ---- figures -----------------------------------------------------------------------------------


def row_figures(runs: Sequence[RunSummary]) -> dict[str, object]:
    reached = [r.flops_to_target for r in runs if r.flops_to_target is not None]
    return {
        "seeds": [r.spec.seed for r in runs],
        "final": spread([r.final for r in runs]),
        "own": spread([r.final_own for r in runs]),
        # Median over the seeds that reached the target; how many did is given beside it.
        "flops_to_target": spread(reached) if reached else None,
        "reached": len(reached),
        "flops_per_sample_peer": runs[0].flops_per_sample_peer,
        "flops_per_sample_full": runs[0].flops_per_sample_full,
        "bytes_per_round_peer": spread([r.bytes_per_round_peer for r in runs]),
        "coverage": min(r.coverage for r in runs),
    }


def _cell(spread: dict[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    if spread is None:
        return "not reached"
    median, low, high = (spread[k] / scale for k in ("median", "min", "max"))
    if low == high:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({low:.{digits}f}..{high:.{digits}f})"


COLUMNS = {  # "final" and "own" are headed with the task's metric: "final acc", "own ppl"
    # The quarter-width model's own figure is what sizing asks; the assembled full-width
    # model of a static prefix holds untrained entries.
    "sizing": ("own", "final"),
    "a": ("MFLOPs/sample", "per-peer GFLOPs to target", "reached", "final"),
    "b": ("per-peer GFLOPs to target", "reached", "final"),
    "c": ("final", "per-peer GFLOPs to target"),
    "d": ("final", "KiB sent per peer per round"),
    "e": ("final", "own"),
}


def _header(name: str, metric: Metric) -> str:
    return f"{name} {metric.short}" if name in ("final", "own") else name


def _column(name: str, row: dict, seeds: int) -> str:
    if name in ("final", "own"):
        return _cell(row[name])
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
    markdown = [f"task {settings.task}, {settings.peers} peers ({settings.partition}), "
                f"{settings.rounds} rounds x {settings.steps} steps, shard {settings.shard_size}, "
                f"target {settings.target}, seeds {', '.join(map(str, seeds))}"]
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
    """a, c, d, e: the metric against per-peer FLOPs (first seed); b: FLOPs to target against N."""
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
                    "cumulative training GFLOPs per peer", f"global {settings.metric.name}",
                    log_x=True)


# ---- command line ------------------------------------------------------------------------------


def _tables(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [t for t in chosen if t not in TABLES]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(
            f"tables={text!r} is invalid: choose from {', '.join(TABLES)} (comma list)")
    return chosen


def _target(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:  # finite and positive; the task's metric bounds it further
        raise argparse.ArgumentTypeError(f"target={text!r} is invalid: must be a positive number")
    return value


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
    accuracy.add_argument("--seeds", type=seeds_arg, default=(0, 1), metavar="S[,S...]",
                          help="seeds of every row (default: 0,1)")
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
    return Settings(
        task=args.task, rounds=pick("rounds"), steps=pick("steps"),
        shard_size=pick("shard_size"), peers=args.peers,
        partition=scoring.partition if args.partition is None else args.partition,
        eval_every=pick("eval_every"), eval_samples=pick("eval_samples"), target=target,
    )


def run_accuracy_command(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    run_accuracy(settings_from(args), args.tables, args.seeds, args.out, args.reuse)
    print((args.out / "accuracy.md").read_text())
    return 0
