"""Command-line parsing only: every command hands a typed config to one function elsewhere."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from peerd import __version__
from peerd.config import ConfigError, SimConfig, parse_mu
from peerd.data import DatasetMissing
from peerd.data.partition import parse_partition
from peerd.plan import PLANNERS
from peerd.tasks import TASKS


def _mu(text: str) -> tuple[float, ...]:
    try:
        return parse_mu(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _partition(text: str) -> str:
    try:
        parse_partition(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _add_sim(commands: argparse._SubParsersAction) -> None:
    defaults = SimConfig()
    sim = commands.add_parser(
        "sim", help="train N peers in one process over an in-memory transport",
        description="Run N peers in one process: the algorithm without a network.",
    )
    sim.add_argument("--peers", type=int, default=defaults.peers, help="number of peers")
    sim.add_argument("--topology", default=defaults.topology,
                     help="ring, full, or the path of a topology TOML file")
    sim.add_argument("--method", choices=sorted(PLANNERS), default=defaults.method)
    sim.add_argument("--mu", type=_mu, default=defaults.mu, metavar="F[,F...]",
                     help="width ratio: one value, or one per peer (cycled)")
    sim.add_argument("--task", choices=sorted(TASKS), default=defaults.task)
    sim.add_argument("--rounds", type=int, default=defaults.rounds)
    sim.add_argument("--seed", type=int, default=defaults.seed)
    sim.add_argument("--partition", type=_partition, default=defaults.partition,
                     metavar="iid|dirichlet:ALPHA|natural")
    sim.add_argument("--data-dir", default=None, help="your own copy of the task's data")
    sim.add_argument("--out", default=defaults.out, help="directory for metrics and plots")
    sim.add_argument("--eval-every", type=int, default=defaults.eval_every,
                     help="evaluate the assembled model every K rounds")
    sim.add_argument("--eval-samples", type=int, default=None,
                     help="global test samples per evaluation (default: the task's)")
    sim.add_argument("--quiet", action="store_true", help="no progress line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peerd", description="Serverless decentralized training of overlapping sub-models."
    )
    parser.add_argument("--version", action="version", version=f"peerd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_sim(commands)
    return parser


def _sim(args: argparse.Namespace) -> int:
    from peerd.progress import ProgressLine
    from peerd.sim import run

    config = SimConfig(
        peers=args.peers, topology=args.topology, method=args.method, mu=args.mu,
        task=args.task, rounds=args.rounds, seed=args.seed, partition=args.partition,
        data_dir=args.data_dir, out=args.out, eval_every=args.eval_every,
        eval_samples=args.eval_samples,
    )
    progress = ProgressLine(enabled=not args.quiet)

    def show(record: dict) -> None:
        quality = "" if record["global_acc"] is None else f"  global_acc {record['global_acc']:.3f}"
        if record.get("global_ppl") is not None:
            quality += f"  ppl {record['global_ppl']:.2f}"
        progress.update(
            f"round {record['round']}/{config.rounds}{quality}  "
            f"loss {record['train_loss_mean']:.3f}  coverage {record['coverage']:.3f}  "
            f"{record['bytes_sent_peer_mean'] / 1024:.0f} KiB/peer  {record['wall_s']:.1f} s"
        )

    records = run(config, show)
    progress.close()
    final = records[-1]
    summary = f"done: {config.rounds} rounds, global_acc {final['global_acc']:.4f}"
    if "global_ppl" in final:
        summary += f", global_ppl {final['global_ppl']:.2f}"
    print(f"{summary}, coverage {final['coverage']:.4f}; metrics in {config.out}/metrics.jsonl")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"sim": _sim}[args.command](args)
    except (ConfigError, DatasetMissing, ValueError) as error:
        print(f"peerd: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
