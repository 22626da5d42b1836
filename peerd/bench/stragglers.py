"""`peerd bench stragglers`: wall time to a target accuracy with one slow peer, strict rounds
against semi-asynchronous ones.

Each mode is a real local cluster (`peerd cluster`'s launcher and watcher: N `peerd start`
processes on loopback, gRPC over mutual TLS, one torch thread each) in which the last peer
trains `--slowdown` times slower (`peerd start --slowdown`: it sleeps after training for
(slowdown - 1) times its training time, so the slowness does not take CPU from the others).
The watcher evaluates the global model after every round, once every daemon has finished that
round or skipped past it (a semi-asynchronous straggler contributes its parameters after the
last round it ran), and notes the wall time. The time to target runs from the evaluation of
round 1 to that of the first round whose global accuracy reaches `--target`: start-up (imports,
data, the first handshakes, every daemon's first round) takes 15 to 40 s on a loaded machine,
whichever the mode, and would drown the difference; it is reported apart.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peerd.bench.processes import BenchError, positive_int, print_result
from peerd.cluster import ClusterConfig, ClusterError, run_cluster

MODES = {"strict": True, "semi-async": False}  # name -> ClusterConfig.sync


@dataclass(frozen=True)
class ModeRun:
    mode: str
    rounds: int
    seconds_to_target: float | None  # after round 1; None: the target was never reached
    round_to_target: int | None
    final_acc: float
    startup_s: float  # until round 1 was evaluated
    wall_s: float  # until the last round was evaluated
    curve: tuple[tuple[int, float, float], ...]  # (round, seconds after round 1, global acc)

    def to_json(self) -> dict[str, object]:
        return {"mode": self.mode, "rounds": self.rounds,
                "seconds_to_target": None if self.seconds_to_target is None
                else round(self.seconds_to_target, 2),
                "round_to_target": self.round_to_target,
                "final_acc": round(self.final_acc, 4), "startup_s": round(self.startup_s, 2),
                "wall_s": round(self.wall_s, 2),
                "curve": [[number, round(seconds, 2), round(accuracy, 4)]
                          for number, seconds, accuracy in self.curve]}


@dataclass(frozen=True)
class StragglersResult:
    peers: int
    slowdown: float
    target: float
    strict: ModeRun
    semi_async: ModeRun

    @property
    def time_ratio(self) -> float | None:
        """Semi-async's time to target over strict's (the issue's target: at most 0.6)."""
        strict, semi_async = self.strict.seconds_to_target, self.semi_async.seconds_to_target
        if not strict or semi_async is None:  # never reached, or at round 1: nothing to compare
            return None
        return semi_async / strict

    @property
    def accuracy_drop(self) -> float:
        """Strict's final accuracy minus semi-async's (the issue's target: at most 0.01)."""
        return self.strict.final_acc - self.semi_async.final_acc

    def to_json(self) -> dict[str, object]:
        ratio = self.time_ratio
        return {"peers": self.peers, "slowdown": self.slowdown, "target": self.target,
                "strict": self.strict.to_json(), "semi_async": self.semi_async.to_json(),
                "time_ratio": None if ratio is None else round(ratio, 3),
                "accuracy_drop": round(self.accuracy_drop, 4)}

    def describe(self) -> str:
        lines = [f"{self.peers} peers, the last one {self.slowdown:g}x slower at training; "
                 f"target global accuracy {self.target:g}",
                 f"{'mode':>10} {'s to target':>12} {'round':>6} {'final acc':>10} "
                 f"{'wall s':>8}"]
        for run in (self.strict, self.semi_async):
            seconds = "never" if run.seconds_to_target is None else f"{run.seconds_to_target:.1f}"
            reached = "-" if run.round_to_target is None else str(run.round_to_target)
            lines.append(f"{run.mode:>10} {seconds:>12} {reached:>6} {run.final_acc:>10.4f} "
                         f"{run.startup_s:>10.1f} {run.wall_s:>8.1f}")
        ratio = self.time_ratio
        lines.append(f"time ratio semi-async / strict: "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}'}; final accuracy drop: "
                     f"{self.accuracy_drop * 100:+.1f} points")
        return "\n".join(lines)


def run_mode(mode: str, peers: int, rounds: int, slowdown: float, target: float, task: str,
             out: Path) -> ModeRun:
    config = ClusterConfig(peers=peers, task=task, rounds=rounds, out=str(out),
                           sync=MODES[mode], slowdown=(1.0,) * (peers - 1) + (slowdown,))
    try:
        records = run_cluster(config)
    except ClusterError as error:
        raise BenchError(f"{mode} cluster failed: {error}") from None
    reached = next((r for r in records if r["global_acc"] >= target), None)
    startup_s = records[0]["wall_s"]
    curve = tuple((r["round"], r["wall_s"] - startup_s, r["global_acc"]) for r in records)
    return ModeRun(mode, rounds, None if reached is None else reached["wall_s"] - startup_s,
                   None if reached is None else reached["round"], records[-1]["global_acc"],
                   startup_s, records[-1]["wall_s"], curve)


def run_stragglers(peers: int, rounds: int, slowdown: float, target: float,
                   task: str) -> StragglersResult:
    if peers < 3:
        raise BenchError("at least 3 peers: with 2, each has one neighbour, which every round "
                         "needs for its quorum")
    with tempfile.TemporaryDirectory(prefix="peerd-bench-stragglers-") as scratch:
        runs = {mode: run_mode(mode, peers, rounds, slowdown, target, task,
                               Path(scratch) / mode.replace("-", "_"))
                for mode in MODES}
    return StragglersResult(peers, slowdown, target, runs["strict"], runs["semi-async"])


# ---- command line -----------------------------------------------------------------------------


def _number_in(name: str, low: float, high: float = math.inf) -> Callable[[str], float]:
    """An argument type: a number in [low, high], refused with a message naming it."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} {value} must be in [{low:g}, {high:g}]")
        return value

    return parse


def add_stragglers_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `stragglers` (under `peerd bench`); its `func` runs the benchmark."""
    stragglers = subparsers.add_parser(
        "stragglers", help="time to a target accuracy with one slow peer, strict vs semi-async",
        description="Run a real local cluster twice, strict (--sync) and semi-asynchronous, "
                    "with its last peer training --slowdown times slower; report the wall "
                    "time until the global model reaches --target and the final accuracy.",
    )
    stragglers.add_argument("--peers", type=positive_int, default=4,
                            help="daemons (default: %(default)s)")
    stragglers.add_argument("--rounds", type=positive_int, default=20,
                            help="rounds per run (default: %(default)s)")
    stragglers.add_argument("--slowdown", type=_number_in("slowdown", 1), default=4.0,
                            help="how many times slower the last peer trains "
                                 "(default: %(default)s)")
    stragglers.add_argument("--target", type=_number_in("target", 0, 1), default=0.9,
                            help="global accuracy to reach (default: %(default)s)")
    stragglers.add_argument("--task", default="digits", help="task (default: %(default)s)")
    stragglers.add_argument("--json", action="store_true", help="print one JSON object")
    stragglers.set_defaults(func=run_stragglers_command)


def run_stragglers_command(args: argparse.Namespace) -> int:
    return print_result(
        "stragglers",
        lambda: run_stragglers(args.peers, args.rounds, args.slowdown, args.target, args.task),
        args.json)
