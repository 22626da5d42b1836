"""Command-line parsing only: every command hands a typed config to one function elsewhere."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from peerd import __version__
from peerd.bench.accuracy import add_accuracy_parser
from peerd.bench.capacity import add_capacity_parser
from peerd.bench.compute import add_compute_parser
from peerd.bench.exchange import add_exchange_parser
from peerd.bench.memory import add_memory_parser
from peerd.bench.processes import partition_arg, positive_int
from peerd.bench.scale import add_scale_parser
from peerd.bench.stragglers import add_stragglers_parser
from peerd.bench.wire import add_wire_parser
from peerd.ca import DEFAULT_CA_DIR, DEVICE_KEY, DEVICE_ROLE, ROLES, init_ca, issue
from peerd.cluster import ClusterConfig, ClusterError
from peerd.config import (
    AUTO,
    DEFAULT_CONFIG_FILE,
    WIRE_DTYPES,
    ConfigError,
    DaemonConfig,
    SimConfig,
    TrainConfig,
    check_depth,
    daemon_options,
    load_daemon_config,
    option_flag,
    option_type,
    parse_depth,
    parse_mu,
    parse_option_text,
    parse_overlap,
    parse_size,
    reference_table,
    required_type,
)
from peerd.data import DatasetMissing
from peerd.net.codec import WireError
from peerd.plan import PLANNERS
from peerd.progress import ProgressLine
from peerd.report import add_report_parser
from peerd.tasks import TASKS, get_task


def _mu(text: str) -> tuple[float, ...]:
    try:
        return parse_mu(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _depth(text: str) -> tuple[int, ...]:
    try:
        return parse_depth(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_sim(commands: argparse._SubParsersAction) -> None:
    defaults = SimConfig()
    sim = commands.add_parser(
        "sim", help="train N peers in one process over an in-memory transport",
        description="Run N peers in one process: the algorithm without a network.",
    )
    sim.add_argument("--peers", type=int, default=defaults.peers, help="number of peers")
    _add_learning_options(sim, measured_mu=False)
    sim.add_argument("--rounds", type=int, default=defaults.rounds)
    sim.add_argument("--out", default=defaults.out, help="directory for metrics and plots")
    sim.add_argument("--eval-every", type=int, default=defaults.eval_every,
                     help="evaluate the assembled model every K rounds")
    sim.add_argument("--eval-samples", type=int, default=None,
                     help="global test samples per evaluation (default: the task's)")
    sim.add_argument("--quiet", action="store_true", help="no progress line")
    add_msfusion_options(sim)
    sim.set_defaults(func=_sim)


def _overlap(text: str) -> str:
    try:
        parse_overlap(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a positive number")
    return value


def add_msfusion_options(parser: argparse.ArgumentParser) -> None:
    """The contrastive term and the overlap schedule (docs/ALGORITHM.md)."""
    train = TrainConfig()
    parser.add_argument("--contrastive", action=argparse.BooleanOptionalAction,
                        default=train.contrastive,
                        help="MOON-style model-contrastive term (default: off)")
    parser.add_argument("--contrastive-weight", type=_positive_float,
                        default=train.contrastive_weight, metavar="LAMBDA",
                        help="weight of the contrastive term (default: %(default)s)")
    parser.add_argument("--contrastive-tau", type=_positive_float,
                        default=train.contrastive_tau, metavar="TAU",
                        help="temperature of the contrastive term (default: %(default)s)")
    parser.add_argument("--overlap", type=_overlap, default=SimConfig().overlap,
                        metavar="static|decay:H",
                        help="msfusion's overlap schedule (default: %(default)s)")
    parser.add_argument("--drift-period", type=positive_int, default=SimConfig().drift_period,
                        metavar="R", help="msfusion: rounds in which the first unit group's "
                        "windows drift once around; the r-th group drifts r + 1 times as fast "
                        "(default: %(default)s)")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The task's training defaults with the contrastive and early-exit options of the command
    line."""
    return dataclasses.replace(
        get_task(args.task).train, contrastive=args.contrastive,
        contrastive_weight=args.contrastive_weight, contrastive_tau=args.contrastive_tau,
        early_exits=args.early_exits, distill_temperature=_temperature(args))


def _mu_or_auto(text: str) -> tuple[float, ...] | str:
    return AUTO if text.strip().lower() == AUTO else _mu(text)


def _add_learning_options(parser: argparse.ArgumentParser, measured_mu: bool) -> None:
    """The options the simulator and a local cluster share; only real daemons can measure
    their width (auto)."""
    parser.add_argument("--topology", default="ring",
                        help="ring, full, or the path of a topology TOML file")
    parser.add_argument("--method", choices=sorted(PLANNERS), default="msfusion")
    if measured_mu:
        parser.add_argument("--mu", type=_mu_or_auto, default=SimConfig().mu,
                            metavar="F[,F...]|auto",
                            help="width ratio: one value, one per daemon (cycled), or auto "
                                 "(each daemon measures what it affords)")
        parser.add_argument("--memory-budget", default=None, metavar="SIZE",
                            help="with --mu auto: each daemon's memory budget, e.g. 800M")
    else:
        parser.add_argument("--mu", type=_mu, default=SimConfig().mu, metavar="F[,F...]",
                            help="width ratio: one value, or one per peer (cycled)")
    parser.add_argument("--task", choices=sorted(TASKS), default="digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partition", type=partition_arg, default="iid",
                        metavar="iid|dirichlet:ALPHA|natural")
    parser.add_argument("--data-dir", default=None, help="your own copy of the task's data")
    parser.add_argument("--wire-dtype", choices=WIRE_DTYPES, default="float32",
                        help="precision of exchanged values (default: %(default)s)")
    parser.add_argument("--early-exits", action="store_true",
                        help="an exit head after every block, CE on every exit (and "
                             "self-distillation); needed by --depth")
    parser.add_argument("--depth", type=_depth, default=None, metavar="N[,N...]",
                        help="blocks each peer keeps (the shallowest): one value, or one per "
                             "peer (cycled); default: all")
    parser.add_argument("--learned-width", action="store_true",
                        help="each peer of mu < 1 learns how many units of each group to keep "
                             "on its own data, within its uniform sub-model's FLOPs")
    parser.add_argument("--width-epochs", type=positive_int, default=SimConfig().width_epochs,
                        help="with --learned-width: epochs of unit scoring (default: %(default)s)")
    parser.add_argument("--width-penalty", type=float, default=SimConfig().width_penalty,
                        help="with --learned-width: weight of the FLOPs budget penalty "
                             "(default: %(default)s)")
    distill = parser.add_mutually_exclusive_group()
    distill.add_argument("--distill-temperature", type=float, default=3.0, metavar="T",
                         help="with --early-exits: the deepest exit teaches the others, "
                              "loss CE + T^2 KL (default: %(default)s)")
    distill.add_argument("--no-distill", action="store_true",
                         help="with --early-exits: CE on every exit, no distillation")


def _add_start(commands: argparse._SubParsersAction) -> None:
    start = commands.add_parser(
        "start", help="run one daemon: discover peers, train slices, exchange them",
        description="Run one peerd daemon. Daemons on one LAN find each other by mDNS. "
        f"Options come from the config file (--config, else {DEFAULT_CONFIG_FILE} if present), "
        "then PEERD_* environment variables, then these flags.",
    )
    start.add_argument("--config", default=None, metavar="FILE", help="a TOML config file")
    # One flag per DaemonConfig field: given flags override the file and the environment.
    for option_field in daemon_options():
        name, flag = option_field.name, option_flag(option_field)
        kind = required_type(option_type(name))
        help_text = option_field.metadata["help"]
        if kind is bool:
            action = "store_false" if option_field.default else "store_true"
            start.add_argument(flag, dest=name, action=action, default=argparse.SUPPRESS,
                               help=help_text)
        elif kind == tuple[str, ...]:
            start.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS,
                               metavar="HOST:PORT", help=help_text)
        else:
            start.add_argument(flag, dest=name, type=_option_parser(name),
                               default=argparse.SUPPRESS, help=help_text)
    start.set_defaults(func=_start)


def _option_parser(name: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return parse_option_text(name, text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_config(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser(
        "config", help="show the effective daemon configuration, or the reference table")
    config.add_argument("--config", default=None, metavar="FILE", help="a TOML config file")
    config.add_argument("--reference", action="store_true",
                        help="print the table of every option (docs/CONFIG.md)")
    config.set_defaults(func=_config)


def _add_cluster(commands: argparse._SubParsersAction) -> None:
    defaults = ClusterConfig()
    cluster = commands.add_parser(
        "cluster", help="start N real daemons on loopback and watch them learn",
        description="Start N peerd daemon processes on this machine (real gRPC, real mDNS on "
        "127.0.0.1), evaluate the global model assembled from their slices, write metrics.",
    )
    cluster.add_argument("--peers", type=int, default=defaults.peers)
    _add_learning_options(cluster, measured_mu=True)
    cluster.add_argument("--rounds", type=int, default=defaults.rounds)
    cluster.add_argument("--out", default=defaults.out)
    cluster.add_argument("--eval-every", type=int, default=defaults.eval_every)
    cluster.add_argument("--eval-samples", type=int, default=None)
    cluster.add_argument("--no-mdns", action="store_true",
                         help="daemons find each other only by their static addresses")
    cluster.add_argument("--sync", action="store_true",
                         help="strict synchronous rounds (default: semi-asynchronous, as "
                         "`peerd start`)")
    cluster.add_argument("--quiet", action="store_true", help="no progress line")
    add_msfusion_options(cluster)
    cluster.set_defaults(func=_cluster)


def _add_status(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser("status", help="one daemon's view of the cluster")
    status.add_argument("--addr", default=f"127.0.0.1:{DaemonConfig().port}",
                        metavar="HOST:PORT")
    status.add_argument("--json", action="store_true")
    # Like `peerd start`: the file, then PEERD_TLS_DIR / PEERD_INSECURE, then these flags.
    status.add_argument("--config", default=None, metavar="FILE",
                        help="a TOML config file, for tls_dir and insecure")
    status.add_argument("--tls-dir", dest="tls_dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="call with this device certificate: any of the cluster's will do "
                        f"(default: as `peerd start`, {DaemonConfig().tls_dir})")
    status.add_argument("--insecure", action="store_true", default=argparse.SUPPRESS,
                        help="call a daemon that runs with --insecure")
    status.set_defaults(func=_status)


def _add_ca(commands: argparse._SubParsersAction) -> None:
    ca = commands.add_parser(
        "ca", help="the cluster's certificate authority: create it, issue device certificates",
        description="Daemons accept only peers with a certificate from the cluster's CA, "
        "whose name is the peer id. Create the CA once, on one trusted machine; issue one "
        "certificate per device and copy its directory to the device. See docs/SECURITY.md.",
    )
    actions = ca.add_subparsers(dest="action", required=True)
    init = actions.add_parser("init", help="create the cluster CA (once per cluster)")
    init.add_argument("--dir", default=DEFAULT_CA_DIR,
                      help="where the CA's key and certificate go")
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA: every certificate it issued stops working")
    init.set_defaults(func=_ca_init)
    device = actions.add_parser("issue", help="issue the certificate and key of one device")
    device.add_argument("name", metavar="NAME", help="the device's peer id")
    device.add_argument("--dir", default=DEFAULT_CA_DIR, help="the CA's directory")
    device.add_argument("--out", default=None, metavar="OUTDIR",
                        help="where the device's files go (default: DIR/NAME)")
    device.add_argument("--force", action="store_true",
                        help="replace the key and certificate already in OUTDIR")
    device.add_argument("--role", choices=ROLES, default=DEVICE_ROLE,
                        help="device: a member that trains (default); observer: may call "
                        "Status only (peerd status); reader: Status and Pull, never joins")
    device.set_defaults(func=_ca_issue)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peerd", description="Serverless decentralized training of overlapping sub-models."
    )
    parser.add_argument("--version", action="version", version=f"peerd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_sim(commands)
    _add_start(commands)
    _add_cluster(commands)
    _add_status(commands)
    _add_ca(commands)
    _add_config(commands)
    add_report_parser(commands)
    bench = commands.add_parser("bench", help="measure peerd: see BENCHMARKS.md")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True)
    add_wire_parser(benchmarks)
    add_exchange_parser(benchmarks)
    add_compute_parser(benchmarks)
    add_scale_parser(benchmarks)
    add_stragglers_parser(benchmarks)
    add_memory_parser(benchmarks)
    add_accuracy_parser(benchmarks)
    add_capacity_parser(benchmarks)
    return parser


def _sim(args: argparse.Namespace) -> int:
    from peerd.sim import run

    config = SimConfig(
        peers=args.peers, topology=args.topology, method=args.method, mu=args.mu,
        task=args.task, rounds=args.rounds, seed=args.seed, partition=args.partition,
        data_dir=args.data_dir, out=args.out, eval_every=args.eval_every,
        eval_samples=args.eval_samples, wire_dtype=args.wire_dtype, depth=args.depth,
        train=train_config(args), overlap=args.overlap, drift_period=args.drift_period,
        learned_width=args.learned_width, width_epochs=args.width_epochs,
        width_penalty=args.width_penalty,
    )
    progress = ProgressLine(enabled=not args.quiet)
    records = run(config, _progress_printer(progress, config.rounds))
    progress.close()
    _print_summary(records, config.rounds, config.out)
    return 0


def _temperature(args: argparse.Namespace) -> float | None:
    return None if args.no_distill else args.distill_temperature


def _progress_printer(progress: ProgressLine, rounds: int) -> Callable[[dict], None]:
    def show(record: dict) -> None:
        quality = "" if record["global_acc"] is None else f"  global_acc {record['global_acc']:.3f}"
        if record.get("global_ppl") is not None:
            quality += f"  ppl {record['global_ppl']:.2f}"
        progress.update(
            f"round {record['round']}/{rounds}{quality}  "
            f"loss {record['train_loss_mean']:.3f}  coverage {record['coverage']:.3f}  "
            f"{record['bytes_sent_peer_mean'] / 1024:.0f} KiB/peer  {record['wall_s']:.1f} s"
        )

    return show


def _print_summary(records: list[dict], rounds: int, out: str) -> None:
    final = records[-1]
    summary = f"done: {rounds} rounds, global_acc {final['global_acc']:.4f}"
    if "global_ppl" in final:
        summary += f", global_ppl {final['global_ppl']:.2f}"
    print(f"{summary}, coverage {final['coverage']:.4f}; metrics in {out}/metrics.jsonl")


def _daemon_config(args: argparse.Namespace) -> DaemonConfig:
    flags = {f.name: getattr(args, f.name) for f in daemon_options() if hasattr(args, f.name)}
    if "peers" in flags:
        flags["peers"] = tuple(flags["peers"])
    return load_daemon_config(args.config, os.environ, flags)


def _start(args: argparse.Namespace) -> int:
    from peerd.daemon import serve

    config = _daemon_config(args)
    # In a terminal a live progress line replaces the per-round log lines; under systemd
    # (no terminal) every event is one log line for the journal.
    interactive = sys.stderr.isatty() and config.log_level == "INFO"
    logging.basicConfig(level="WARNING" if interactive else config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = serve(config, show_progress=interactive)
    print(f"{summary.peer_id}: {summary.rounds_done} rounds, {summary.members} members, "
          f"train loss {summary.train_loss:.4f}, sent {summary.bytes_sent} B, "
          f"received {summary.bytes_received} B")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from peerd.cluster import run_cluster

    if args.memory_budget is not None:
        parse_size(args.memory_budget, "memory_budget")
        if args.mu != AUTO:
            raise ConfigError("--memory-budget is only used with --mu auto")
    check_depth(args.depth, args.early_exits)
    config = ClusterConfig(
        peers=args.peers, topology=args.topology, method=args.method, mu=args.mu,
        memory_budget=args.memory_budget, task=args.task, rounds=args.rounds, seed=args.seed,
        partition=args.partition,
        data_dir=args.data_dir, out=args.out, eval_every=args.eval_every,
        eval_samples=args.eval_samples, mdns=not args.no_mdns, wire_dtype=args.wire_dtype,
        sync=args.sync, depth=args.depth, early_exits=args.early_exits,
        distill_temperature=_temperature(args), overlap=args.overlap,
        drift_period=args.drift_period, contrastive=args.contrastive,
        contrastive_weight=args.contrastive_weight, contrastive_tau=args.contrastive_tau,
        learned_width=args.learned_width, width_epochs=args.width_epochs,
        width_penalty=args.width_penalty,
    )
    progress = ProgressLine(enabled=not args.quiet)

    def announce(daemons: list) -> None:
        for daemon in daemons:
            print(f"{daemon.peer_id}: peerd status --addr {daemon.address} "
                  f"--tls-dir {daemon.tls_dir}   "
                  f"metrics {daemon.metrics_url}   logs {daemon.state_dir}/daemon.log",
                  file=sys.stderr)

    records = run_cluster(config, _progress_printer(progress, config.rounds), announce)
    progress.close()
    _print_summary(records, config.rounds, config.out)
    print(f"plots: peerd report --state-dir {config.out}")
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.reference:
        print(reference_table(), end="")
        return 0
    config = _daemon_config(args)
    for option_field in daemon_options():
        print(_toml_line(option_field.name, getattr(config, option_field.name)))
    return 0


def _toml_line(name: str, value: object) -> str:
    """One option as the config file would hold it (an unset one as a comment)."""
    if value is None:
        return f"# {name} is unset"
    if name == "shard":
        index, count = value  # type: ignore[misc]
        return f'{name} = "{index}/{count}"'
    return f"{name} = {json.dumps(list(value) if isinstance(value, tuple) else value)}"


def _status(args: argparse.Namespace) -> int:
    from peerd.net.tls import TlsIdentity
    from peerd.status import show_status

    config = _daemon_config(args)
    tls = None if config.insecure else TlsIdentity.load(config.tls_dir)
    try:
        print(show_status(args.addr, args.json, tls))
    except (grpc.aio.AioRpcError, WireError) as error:
        detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else error.detail
        print(f"peerd: error: no daemon answers at {args.addr}: {detail}", file=sys.stderr)
        return 1
    return 0


def _ca_init(args: argparse.Namespace) -> int:
    ca_dir = init_ca(Path(args.dir), force=args.force)
    print(f"created the cluster CA in {ca_dir}/: ca.crt (the certificate: public) and ca.key "
          f"(the private key, mode 0600: keep it on this machine only, and back it up)\n"
          f"next, for each device: peerd ca issue NAME --dir {ca_dir}")
    return 0


def _ca_issue(args: argparse.Namespace) -> int:
    device = issue(Path(args.dir), args.name, Path(args.out) if args.out else None, args.force,
                   args.role)
    print(f"issued peer id {device.peer_id}: {', '.join(str(p) for p in device.files)} "
          f"({DEVICE_KEY} has mode 0600)\n"
          f"copy these three files, keeping their names, to the device {device.peer_id}: "
          f"into /etc/peerd/tls/ for the systemd service (docs/SYSTEMD.md), or into the "
          f"directory `peerd start --tls-dir DIR` names (default: ./{DaemonConfig().tls_dir}); "
          f"the daemon takes its peer id from the certificate")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetMissing, ValueError, ClusterError) as error:
        print(f"peerd: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
