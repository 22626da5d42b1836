"""`peerd bench capacity`: a mixed-capacity cluster against homogeneous ones at the same total
training compute (issue 5, benchmark c, `--table c`), and self-distillation on and off in a
depth-mixed cluster (benchmark d, `--table d`).

Each pair sets a mixed-width cluster (a strong peer, middling ones, weak ones) beside a
homogeneous cluster whose width is chosen so that the two spend, per round, the same training
FLOPs in total: the sum over peers of forward_flops_per_sample at each peer's width (the
msfusion planner's sub-model, as `peerd bench compute` builds it). The ratio is reported, as
planned from the widths and as measured from the runs' cumulative training FLOPs.

Every cluster is an in-process simulation (`peerd sim`'s engines over the in-memory transport),
8 peers on a ring, one torch thread, iid shards: every peer holds the same amount of data, so
the compute each spends is set by its width alone and the comparison is not mixed up with
label skew. Per cluster and seed it keeps the assembled model's global accuracy and each
peer's own accuracy (its sub-model on its own test split); "final" is the mean over the last
rounds evaluated, which damps the round-to-round swing of a small model on a small task. A
homogeneous cluster at the weakest width, not matched in compute, tells whether a weak peer
gains from training beside strong ones.

Runs are kept in OUT/runs/<cluster>-seed<N>/ (metrics.jsonl and the config that produced
them); `--reuse` reads back any run whose config matches instead of training it again.
OUT/capacity.json, OUT/capacity.md and OUT/capacity.png hold the results. `Variant` carries
SimConfig and TrainConfig fields applied to every cluster.

`--table d` (benchmark d, the self-distillation half): one depth-mixed cluster (mu 0.5 on every
peer, early exits, the peers' depths cycling 2,2,1,1 so that every other pair of peers drops
the deepest block) run with self-distillation at T = 3 and with it off, over the same seeds.
It reports the global accuracy, the shallow and deep peers' own accuracy (a peer's own
sub-model answers from its deepest kept exit) and the per-seed differences, in
OUT/capacity-distill.{json,md,png}; runs are kept in OUT/runs/distill-<on|off>-seed<N>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.submodel import forward_flops_per_sample
from peerd.bench.processes import BenchError, positive_int, print_result, seeds_arg
from peerd.bench.stored import config_json, run_or_reuse, spread
from peerd.config import SimConfig, train_options
from peerd.data import load_task_data
from peerd.models.base import DEPTH, ModelSpec, plan_units
from peerd.ops.plots import plot_series
from peerd.tasks import BLOCK_SIZE, get_task

PEERS = 8
PARTITION = "iid"  # equal shards: a peer's compute depends on its width only
METHOD = "msfusion"
FLOPS_TOLERANCE = 0.05  # a pair's planned total-FLOPs ratio must be within 1 +- this
FINAL_ROUNDS = 5  # "final" accuracy: mean over this many last evaluated rounds
DEFAULT_ROUNDS = 40
DEFAULT_SEEDS = (0, 1, 2)
QUICK_ROUNDS = 1
QUICK_LOCAL_EPOCHS = 1


@dataclass(frozen=True)
class Cluster:
    name: str
    mu: tuple[float, ...]  # one per peer

    @property
    def widths(self) -> list[float]:
        return sorted(set(self.mu), reverse=True)


@dataclass(frozen=True)
class Pair:
    mixed: Cluster
    homogeneous: Cluster


def _homogeneous(mu: float) -> Cluster:
    return Cluster(f"homogeneous-{mu:g}", (mu,) * PEERS)


PAIRS = (
    Pair(Cluster("mixed-A", (0.5, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125, 0.125)),
         _homogeneous(0.25)),
    Pair(Cluster("mixed-B", (1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25)), _homogeneous(0.5)),
)
# The weak peers' cluster of their own kind: not matched in compute, a reference only.
REFERENCES = (_homogeneous(0.125),)


@dataclass(frozen=True)
class Variant:
    """SimConfig fields and TrainConfig fields applied to every cluster of a table (none: width
    only)."""

    name: str = "width only"
    overrides: Mapping[str, object] = field(default_factory=dict)
    train: Mapping[str, object] = field(default_factory=dict)


# ---- compute per width --------------------------------------------------------------------------


def width_flops(spec: ModelSpec, widths: Sequence[float]) -> dict[float, int]:
    """Forward FLOPs per sample of the sub-model a peer of each width trains."""
    planner = make_planner(METHOD, 0)
    flops = {}
    for mu in widths:
        plan = planner.plan(0, [Member("peer", mu)], spec.groups)["peer"]
        flops[mu] = forward_flops_per_sample(spec, plan_units(plan))
    return flops


def planned_ratio(pair: Pair, flops: Mapping[float, int]) -> float:
    """The mixed cluster's total forward FLOPs per sample over the homogeneous one's."""
    return sum(flops[mu] for mu in pair.mixed.mu) / sum(flops[mu] for mu in pair.homogeneous.mu)


# ---- runs ---------------------------------------------------------------------------------------


def _run_config(cluster: Cluster, seed: int, rounds: int, task: str, quick: bool,
                variant: Variant, out: Path) -> SimConfig:
    train_fields = {**variant.train, **({"local_epochs": QUICK_LOCAL_EPOCHS} if quick else {})}
    train = dataclasses.replace(get_task(task).train, **train_fields) if train_fields else None
    config = SimConfig(peers=PEERS, method=METHOD, mu=cluster.mu, task=task, rounds=rounds,
                       seed=seed, partition=PARTITION, train=train,
                       **(train_options(train) if train is not None else {}),
                       out=str(out / "runs" / f"{cluster.name}-seed{seed}"))
    return dataclasses.replace(config, **variant.overrides)


@dataclass(frozen=True)
class ClusterRun:
    """One cluster's figures for one seed."""

    seed: int
    global_acc: float  # mean over the final rounds
    peer_acc: tuple[float, ...]  # by position, each the mean over the final rounds
    train_flops: tuple[int, ...]  # by position, over the whole run
    curve: tuple[float, ...]  # global accuracy by round


def summarize_run(seed: int, records: Sequence[dict]) -> ClusterRun:
    evaluated = [r for r in records if r["global_acc"] is not None]
    final = evaluated[-FINAL_ROUNDS:]
    peers = len(final[0]["peer_acc"])
    return ClusterRun(
        seed, statistics.fmean(r["global_acc"] for r in final),
        tuple(statistics.fmean(r["peer_acc"][p] for r in final) for p in range(peers)),
        tuple(records[-1]["train_flops_cum_peer"]),
        tuple(r["global_acc"] for r in evaluated),
    )


# ---- results ------------------------------------------------------------------------------------


def _text(summary: Mapping[str, float]) -> str:
    return f"{summary['median']:.3f} [{summary['min']:.3f}, {summary['max']:.3f}]"


@dataclass(frozen=True)
class ClusterResult:
    cluster: Cluster
    rounds: int
    runs: tuple[ClusterRun, ...]  # one per seed

    def global_acc(self) -> dict[str, float]:
        return spread([run.global_acc for run in self.runs])

    def total_train_flops(self) -> int:
        return round(statistics.median(sum(run.train_flops) for run in self.runs))

    def by_width(self, flops: Mapping[float, int]) -> list[dict[str, object]]:
        """Per width: peers, forward FLOPs per sample, training FLOPs per peer per round (median
        over peers and seeds), own accuracy (per seed the mean over the width's peers)."""
        rows = []
        for mu in self.cluster.widths:
            positions = [p for p, m in enumerate(self.cluster.mu) if m == mu]
            per_round = [run.train_flops[p] / self.rounds for run in self.runs for p in positions]
            accuracy = [statistics.fmean(run.peer_acc[p] for p in positions) for run in self.runs]
            rows.append({"mu": mu, "peers": len(positions),
                         "forward_flops_per_sample": flops[mu],
                         "train_flops_per_round": round(statistics.median(per_round)),
                         "own_acc": spread(accuracy)})
        return rows

    def to_json(self, flops: Mapping[float, int]) -> dict[str, object]:
        return {"name": self.cluster.name, "mu": list(self.cluster.mu),
                "global_acc": self.global_acc(), "total_train_flops": self.total_train_flops(),
                "by_width": self.by_width(flops),
                "seeds": [dataclasses.asdict(run) for run in self.runs]}


@dataclass(frozen=True)
class CapacityResult:
    task: str
    rounds: int
    seeds: tuple[int, ...]
    variant: Variant
    flops: Mapping[float, int]  # forward FLOPs per sample by width
    pairs: tuple[tuple[ClusterResult, ClusterResult], ...]  # (mixed, homogeneous)
    references: tuple[ClusterResult, ...]

    def pair_ratios(self) -> list[dict[str, float]]:
        return [{"planned": round(planned_ratio(Pair(m.cluster, h.cluster), self.flops), 4),
                 "measured": round(m.total_train_flops() / h.total_train_flops(), 4)}
                for m, h in self.pairs]

    def clusters(self) -> list[ClusterResult]:
        return [c for pair in self.pairs for c in pair] + list(self.references)

    def to_json(self) -> dict[str, object]:
        return {
            "task": self.task, "peers": PEERS, "partition": PARTITION, "rounds": self.rounds,
            "seeds": list(self.seeds), "final_rounds": FINAL_ROUNDS,
            "variant": {"name": self.variant.name, "overrides": dict(self.variant.overrides),
                        "train": dict(self.variant.train)},
            "forward_flops_per_sample": {str(mu): f for mu, f in self.flops.items()},
            "pairs": [{"mixed": m.cluster.name, "homogeneous": h.cluster.name, "flops_ratio": r}
                      for (m, h), r in zip(self.pairs, self.pair_ratios(), strict=True)],
            "clusters": [c.to_json(self.flops) for c in self.clusters()],
        }

    def markdown(self) -> str:
        """Two tables: clusters (global accuracy, compute) and peers by width (own accuracy)."""
        lines = [
            f"{self.task}, {PEERS} peers, {PARTITION}, {self.rounds} rounds, seeds "
            f"{','.join(map(str, self.seeds))}, {self.variant.name}; accuracy: mean of the last "
            f"{FINAL_ROUNDS} rounds, median [min, max] over seeds",
            "",
            "| cluster | mu by peer | FLOPs vs its pair (planned / measured) "
            "| training GFLOPs, whole cluster | global accuracy |",
            "|---|---|---|---|---|",
        ]
        ratios = {m.cluster.name: r for (m, _), r in zip(self.pairs, self.pair_ratios(),
                                                         strict=True)}
        for result in self.clusters():
            ratio = ratios.get(result.cluster.name)
            matched = "1 (reference)" if any(result is h for _, h in self.pairs) else "not matched"
            if ratio is not None:
                matched = f"{ratio['planned']:.3f}x / {ratio['measured']:.3f}x"
            widths = ",".join(f"{m:g}" for m in result.cluster.mu)
            gflops = result.total_train_flops() / 1e9
            lines.append(f"| {result.cluster.name} | {widths} | {matched} | {gflops:.1f} "
                         f"| {_text(result.global_acc())} |")
        lines += ["", "| cluster | mu | peers | forward MFLOPs per sample "
                  "| training GFLOPs per peer per round | own accuracy |",
                  "|---|---|---|---|---|---|"]
        for result in self.clusters():
            for row in result.by_width(self.flops):
                lines.append(f"| {result.cluster.name} | {row['mu']:g} | {row['peers']} "
                             f"| {int(row['forward_flops_per_sample']) / 1e6:.3f} "
                             f"| {int(row['train_flops_per_round']) / 1e9:.3f} "
                             f"| {_text(row['own_acc'])} |")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        return self.markdown()


def _curves(results: Sequence[ClusterResult]) -> dict[str, list[tuple[float, float]]]:
    """Per cluster: (round, global accuracy) points, the median over seeds."""
    return {r.cluster.name: [(float(n), statistics.median(accuracies)) for n, accuracies in
                             enumerate(zip(*(run.curve for run in r.runs), strict=True), 1)]
            for r in results}


def run_capacity(task: str, rounds: int, seeds: Sequence[int], out: Path, reuse: bool = False,
                 quick: bool = False, variant: Variant | None = None) -> CapacityResult:
    variant = variant or Variant()
    torch.set_num_threads(1)  # runs share the machine's cores; more threads only contend
    definition = get_task(task)
    spec = definition.model(load_task_data(task, block_size=BLOCK_SIZE))
    clusters = [c for pair in PAIRS for c in (pair.mixed, pair.homogeneous)] + list(REFERENCES)
    flops = width_flops(spec, sorted({mu for c in clusters for mu in c.mu}))
    for pair in PAIRS:
        ratio = planned_ratio(pair, flops)
        if abs(ratio - 1) > FLOPS_TOLERANCE:
            raise BenchError(f"{pair.mixed.name} against {pair.homogeneous.name}: planned FLOPs "
                             f"ratio {ratio:.3f} is outside 1 +- {FLOPS_TOLERANCE} on {task}")
    results = {}
    for cluster in clusters:
        runs = []
        for seed in seeds:
            config = _run_config(cluster, seed, rounds, task, quick, variant, out)
            runs.append(summarize_run(seed, run_or_reuse(config, reuse)))
        results[cluster.name] = ClusterResult(cluster, rounds, tuple(runs))
    result = CapacityResult(
        task, rounds, tuple(seeds), variant, flops,
        tuple((results[p.mixed.name], results[p.homogeneous.name]) for p in PAIRS),
        tuple(results[c.name] for c in REFERENCES))
    (out / "capacity.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    (out / "capacity.md").write_text(result.markdown())
    plot_series(_curves(result.clusters()), out / "capacity.png",
                f"capacity: mixed against homogeneous, {task}, {PEERS} peers", "round",
                "global accuracy (median over seeds)")
    return result


# ---- table d: self-distillation on and off -----------------------------------------------------

DISTILL_MU = 0.5
DISTILL_DEPTHS = (2, 2, 1, 1)  # cycled over the peers: blocks kept, the deep peers first
DISTILL_TEMPERATURE = 3.0
DISTILL_ROUNDS = 60  # 2 x 3 runs in about 9 minutes on 2 shared cores (BENCHMARKS.md)
DISTILL_ON = Cluster("distill-on", (DISTILL_MU,) * PEERS)
DISTILL_OFF = Cluster("distill-off", (DISTILL_MU,) * PEERS)


def _distill_variant(temperature: float | None) -> Variant:
    name = "distillation off" if temperature is None else f"distillation T={temperature:g}"
    return Variant(name, {"depth": DISTILL_DEPTHS},
                   {"early_exits": True, "distill_temperature": temperature})


def _depth_of(position: int) -> int:
    return DISTILL_DEPTHS[position % len(DISTILL_DEPTHS)]


def _differences(on: Sequence[float], off: Sequence[float]) -> list[float]:
    return [round(a - b, 4) for a, b in zip(on, off, strict=True)]


@dataclass(frozen=True)
class DistillResult:
    """The depth-mixed cluster with self-distillation on and off, seed by seed."""

    task: str
    rounds: int
    seeds: tuple[int, ...]
    blocks: int  # of the full model
    on: ClusterResult
    off: ClusterResult
    on_config: SimConfig  # the first seed's run (the others differ in seed and out only)
    off_config: SimConfig

    def own_acc(self, result: ClusterResult, depth: int) -> list[float]:
        """Per seed: the mean own accuracy of the peers that keep `depth` blocks."""
        positions = [p for p in range(PEERS) if _depth_of(p) == depth]
        return [statistics.fmean(run.peer_acc[p] for p in positions) for run in result.runs]

    def rows(self) -> list[dict[str, object]]:
        """Per figure (global accuracy, own accuracy by depth): on, off, on minus off per seed."""
        figures = [("global accuracy", [r.global_acc for r in self.on.runs],
                    [r.global_acc for r in self.off.runs])]
        for depth in sorted(set(DISTILL_DEPTHS)):
            peers = sum(_depth_of(p) == depth for p in range(PEERS))
            figures.append((f"own accuracy, depth {depth} ({peers} peers)",
                            self.own_acc(self.on, depth), self.own_acc(self.off, depth)))
        return [{"figure": name, "on": spread(on), "off": spread(off),
                 "on_minus_off": _differences(on, off)} for name, on, off in figures]

    def to_json(self) -> dict[str, object]:
        return {
            "task": self.task, "peers": PEERS, "partition": PARTITION, "rounds": self.rounds,
            "seeds": list(self.seeds), "final_rounds": FINAL_ROUNDS, "mu": DISTILL_MU,
            "depths": list(DISTILL_DEPTHS), "blocks": self.blocks,
            "temperature": DISTILL_TEMPERATURE, "rows": self.rows(),
            "clusters": [{"name": r.cluster.name, "config": config_json(config),
                          "seeds": [dataclasses.asdict(run) for run in r.runs]}
                         for r, config in ((self.on, self.on_config),
                                           (self.off, self.off_config))],
        }

    def markdown(self) -> str:
        depths = ",".join(map(str, DISTILL_DEPTHS))
        lines = [
            f"{self.task}, {PEERS} peers, {PARTITION}, mu {DISTILL_MU:g}, early exits, depths "
            f"{depths} (of {self.blocks} blocks) cycled, {self.rounds} rounds, seeds "
            f"{','.join(map(str, self.seeds))}; accuracy: mean of the last {FINAL_ROUNDS} "
            "rounds, median [min, max] over seeds",
            "",
            f"| figure | distillation T={DISTILL_TEMPERATURE:g} | off | on - off, per seed |",
            "|---|---|---|---|",
        ]
        for row in self.rows():
            differences = ", ".join(f"{d:+.3f}" for d in row["on_minus_off"])
            lines.append(f"| {row['figure']} | {_text(row['on'])} | {_text(row['off'])} "
                         f"| {differences} |")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        return self.markdown()


def run_distill(task: str, rounds: int, seeds: Sequence[int], out: Path, reuse: bool = False,
                quick: bool = False) -> DistillResult:
    torch.set_num_threads(1)  # as in run_capacity
    spec = get_task(task).model(load_task_data(task, block_size=BLOCK_SIZE), True)
    blocks = spec.groups[DEPTH].units
    if not min(DISTILL_DEPTHS) < blocks >= max(DISTILL_DEPTHS):
        raise BenchError(f"depths {DISTILL_DEPTHS} on {task}'s {blocks} blocks: the shallow "
                         "peers must drop blocks and no peer may keep more than there are")
    results, configs = {}, {}
    for cluster, temperature in ((DISTILL_ON, DISTILL_TEMPERATURE), (DISTILL_OFF, None)):
        runs = []
        for seed in seeds:
            config = _run_config(cluster, seed, rounds, task, quick,
                                 _distill_variant(temperature), out)
            configs.setdefault(cluster.name, config)
            runs.append(summarize_run(seed, run_or_reuse(config, reuse)))
        results[cluster.name] = ClusterResult(cluster, rounds, tuple(runs))
    result = DistillResult(task, rounds, tuple(seeds), blocks, results[DISTILL_ON.name],
                           results[DISTILL_OFF.name], configs[DISTILL_ON.name],
                           configs[DISTILL_OFF.name])
    (out / "capacity-distill.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    (out / "capacity-distill.md").write_text(result.markdown())
    plot_series(_curves((result.on, result.off)), out / "capacity-distill.png",
                f"self-distillation on and off, depths {DISTILL_DEPTHS}, {task}", "round",
                "global accuracy (median over seeds)")
    return result


# ---- command line -------------------------------------------------------------------------------


def add_capacity_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `capacity` (under `peerd bench`); its `func` runs the benchmark."""
    capacity = subparsers.add_parser(
        "capacity", help="a mixed-capacity cluster against homogeneous ones at equal compute",
        description="Table c: simulate 8-peer clusters of mixed widths and homogeneous clusters "
                    "of the same total training FLOPs per round, over several seeds; report "
                    "global accuracy, each width's own accuracy and per-peer FLOPs; writes "
                    "capacity.{json,md,png} to --out. Table d: a depth-mixed cluster with "
                    "self-distillation on and off; writes capacity-distill.{json,md,png}.",
    )
    capacity.add_argument("--table", choices=("c", "d"), default="c",
                          help="c: mixed widths against homogeneous at equal compute; d: a "
                               "depth-mixed cluster with self-distillation on and off "
                               "(default: %(default)s)")
    capacity.add_argument("--task", default="digits", help="task (default: %(default)s)")
    capacity.add_argument("--rounds", type=positive_int, default=None,
                          help=f"rounds per run (default: {DEFAULT_ROUNDS} for table c, "
                               f"{DISTILL_ROUNDS} for d, or {QUICK_ROUNDS} with --quick)")
    capacity.add_argument("--seeds", type=seeds_arg, default=None, metavar="N[,N...]",
                          help="seeds (default: " + ",".join(map(str, DEFAULT_SEEDS))
                               + ", or 0 with --quick)")
    capacity.add_argument("--out", type=Path, default=Path("runs/bench-capacity"),
                          help="results and per-run metrics (default: %(default)s)")
    capacity.add_argument("--reuse", action="store_true",
                          help="read back runs already in --out with the same config")
    capacity.add_argument("--quick", action="store_true",
                          help=f"a smoke run: {QUICK_ROUNDS} rounds, one local epoch, seed 0")
    capacity.add_argument("--json", action="store_true", help="print one JSON object")
    capacity.set_defaults(func=run_capacity_command)


def run_capacity_command(args: argparse.Namespace) -> int:
    table = run_capacity if args.table == "c" else run_distill
    full_rounds = DEFAULT_ROUNDS if args.table == "c" else DISTILL_ROUNDS
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else full_rounds)
    seeds = args.seeds or ((0,) if args.quick else DEFAULT_SEEDS)
    args.out.mkdir(parents=True, exist_ok=True)
    return print_result(
        "capacity", lambda: table(args.task, rounds, seeds, args.out, args.reuse, args.quick),
        args.json)
