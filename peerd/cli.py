"""Command-line parsing only: every command hands a typed config to one function elsewhere.

Start-up is kept short: a command's parser is built, and its modules imported, only for the
command being run, so `peerd --help`, `--version`, `status`, `ca`, `config`, `report` and
`compare` never load torch (tests/test_first_minutes.py checks it).
"""

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
from typing import TYPE_CHECKING

from peerd import __version__
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
from peerd.ops.ca import DEFAULT_CA_DIR, DEVICE_KEY, DEVICE_ROLE, ROLES
from peerd.ops.progress import Console, global_round_line

if TYPE_CHECKING:
    from peerd.cluster import DaemonProcess


class _Parser(argparse.ArgumentParser):
    """Errors name the (sub)command they belong to and show its usage line only."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        listed = "command" if self.prog == "peerd" else "option"
        self.exit(2, f"{self.prog}: error: {message}\n"
                     f"(`{self.prog} --help` describes every {listed})\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is argparse.SUPPRESS
                or isinstance(action, argparse._HelpAction | argparse._VersionAction)):
            return text
        if isinstance(action.default, bool) or action.default is None:
            shown = {True: "on", False: "off", None: "none"}[action.default]
            return f"{text} (default: {shown})"
        return f"{text} (default: %(default)s)"


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


def _positive_int(text: str) -> int:
    from peerd.bench.processes import positive_int

    return positive_int(text)


# The planners' and tasks' names, as peerd.algorithm.plan.PLANNERS and peerd.tasks.TASKS hold them
# (tests/test_first_minutes.py checks): importing those loads torch, which parsing must not
# wait for.
METHODS = ("fd", "fedrolex", "full", "heterofl", "msfusion")
TASK_NAMES = ("digits", "fmnist", "kjv", "tabular")
CLUSTER_OUT = "runs/cluster"  # ClusterConfig's, as above


def _task(text: str) -> str:
    """A built-in task's name or a reference to a user's (loaded later, with torch)."""
    if text in TASK_NAMES or ":" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(TASK_NAMES)}, or FILE.py:FUNCTION "
        f"or package.module:FUNCTION returning a peerd.Task)")


def _partition(text: str) -> str:
    if text == SimConfig().partition:
        return text  # argparse checks the default too: checking it here would load torch
    from peerd.bench.processes import partition_arg

    return partition_arg(text)


def _add_sim(sim: argparse.ArgumentParser) -> None:
    defaults = SimConfig()
    sim.add_argument("--peers", type=int, default=defaults.peers, help="number of peers")
    _add_learning_options(sim, measured_mu=False)
    sim.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds to run")
    sim.add_argument("--out", default=defaults.out, help="directory for metrics and plots")
    sim.add_argument("--eval-every", type=int, default=defaults.eval_every,
                     help="evaluate the assembled model every K rounds")
    sim.add_argument("--eval-samples", type=int, default=None,
                     help="global test samples per evaluation (default: the task's)")
    sim.add_argument("--quiet", action="store_true", help="print only the final summary")
    add_msfusion_options(sim)
    sim.set_defaults(func=_sim)


def add_msfusion_options(parser: argparse.ArgumentParser) -> None:
    """The contrastive term and the overlap schedule (docs/ALGORITHM.md)."""
    train = TrainConfig()
    parser.add_argument("--contrastive", action=argparse.BooleanOptionalAction,
                        default=train.contrastive,
                        help="MOON-style model-contrastive term (default: off)")
    parser.add_argument("--contrastive-weight", type=_positive_float,
                        default=train.contrastive_weight, metavar="LAMBDA",
                        help="weight of the contrastive term")
    parser.add_argument("--contrastive-tau", type=_positive_float,
                        default=train.contrastive_tau, metavar="TAU",
                        help="temperature of the contrastive term")
    parser.add_argument("--overlap", type=_overlap, default=SimConfig().overlap,
                        metavar="static|decay:H", help="msfusion's overlap schedule")
    parser.add_argument("--drift-period", type=_positive_int, default=SimConfig().drift_period,
                        metavar="R", help="msfusion: rounds in which the first unit group's "
                        "windows drift once around; the r-th group drifts r + 1 times as fast")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The task's training defaults with the contrastive and early-exit options of the command
    line."""
    from peerd.tasks import get_task

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
    parser.add_argument("--method", choices=METHODS, default="msfusion",
                        help="msfusion, or a baseline planner")
    if measured_mu:
        parser.add_argument("--mu", type=_mu_or_auto, default=SimConfig().mu,
                            metavar="F[,F...]|auto",
                            help="width ratio: one value, one per daemon (cycled), or auto "
                                 "(each daemon measures what it affords) (default: 0.5)")
        parser.add_argument("--memory-budget", default=None, metavar="SIZE",
                            help="with --mu auto: each daemon's memory budget, e.g. 800M "
                                 "(default: what the kernel reports available)")
    else:
        parser.add_argument("--mu", type=_mu, default=SimConfig().mu, metavar="F[,F...]",
                            help="width ratio: one value, or one per peer (cycled) "
                                 "(default: 0.5)")
    parser.add_argument("--task", type=_task, default="digits",
                        metavar="digits|fmnist|kjv|tabular|FILE.py:FUNCTION",
                        help="digits (8x8 CNN), fmnist (28x28 CNN), kjv (text), tabular (a CSV "
                             "table, MLP), or your own: "
                             "FILE.py:FUNCTION or package.module:FUNCTION returning a "
                             "peerd.Task")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds init, data split, plans and batches")
    parser.add_argument("--partition", type=_partition, default="iid",
                        metavar="iid|dirichlet:ALPHA|natural", help="how the data is split")
    parser.add_argument("--data-dir", default=None,
                        help="your own copy of the task's data (default: the bundled data): "
                             "IDX files or an image folder (digits, fmnist), text files "
                             "(kjv), a CSV file (tabular)")
    parser.add_argument("--label-column", default="label",
                        help="with --data-dir FILE.csv (task tabular): the column that holds "
                             "the class (default: label)")
    parser.add_argument("--wire-dtype", choices=WIRE_DTYPES, default="float32",
                        help="precision of exchanged values")
    parser.add_argument("--early-exits", action="store_true",
                        help="an exit head after every block, CE on every exit (and "
                             "self-distillation); needed by --depth")
    parser.add_argument("--depth", type=_depth, default=None, metavar="N[,N...]",
                        help="blocks each peer keeps (the shallowest): one value, or one per "
                             "peer (cycled); default: all")
    parser.add_argument("--learned-width", action="store_true",
                        help="each peer of mu < 1 learns how many units of each group to keep "
                             "on its own data, within its uniform sub-model's FLOPs")
    parser.add_argument("--width-epochs", type=_positive_int, default=SimConfig().width_epochs,
                        help="with --learned-width: epochs of unit scoring")
    parser.add_argument("--width-penalty", type=float, default=SimConfig().width_penalty,
                        help="with --learned-width: weight of the FLOPs budget penalty")
    distill = parser.add_mutually_exclusive_group()
    distill.add_argument("--distill-temperature", type=float, default=3.0, metavar="T",
                         help="with --early-exits: the deepest exit teaches the others, "
                              "loss CE + T^2 KL")
    distill.add_argument("--no-distill", action="store_true",
                         help="with --early-exits: CE on every exit, no distillation")


# The help of a flag that turns off an option that is on by default (the option's own help,
# in docs/CONFIG.md, describes it on).
OFF_FLAG_HELP = {
    "mdns": "do not announce this daemon or browse by mDNS: find peers only by their --peer "
            "addresses (default: mDNS on)",
    "distill": "with --early-exits: no self-distillation, CE on every exit only (default: "
               "distillation on)",
}


def _start_help(name: str, help_text: str, default: object) -> str:
    """An option's help with its default, unless the text already says it."""
    if "default" in help_text:
        return help_text
    shown = ("unset" if default is None else "none" if default == ()
             else {True: "on", False: "off"}.get(default, default)  # type: ignore[call-overload]
             if isinstance(default, bool) else default)
    return f"{help_text} (default: {shown})".replace("%", "%%")


def _add_start(start: argparse.ArgumentParser) -> None:
    start.add_argument("--config", default=None, metavar="FILE",
                       help=f"a TOML config file (default: {DEFAULT_CONFIG_FILE} if present)")
    # One flag per DaemonConfig field: given flags override the file and the environment.
    for option_field in daemon_options():
        name, flag = option_field.name, option_flag(option_field)
        kind = required_type(option_type(name))
        help_text = _start_help(name, option_field.metadata["help"], option_field.default)
        if kind is bool:
            if option_field.default:
                start.add_argument(flag, dest=name, action="store_false",
                                   default=argparse.SUPPRESS, help=OFF_FLAG_HELP[name])
            else:
                start.add_argument(flag, dest=name, action="store_true",
                                   default=argparse.SUPPRESS, help=help_text)
        elif kind == tuple[str, ...]:
            start.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS,
                               metavar="HOST:PORT", help=help_text)
        else:
            start.add_argument(flag, dest=name, type=_option_parser(name),
                               default=argparse.SUPPRESS, help=help_text,
                               metavar="I/N" if kind == tuple[int, int] else None)
    start.set_defaults(func=_start)


def _option_parser(name: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return parse_option_text(name, text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_config(config: argparse.ArgumentParser) -> None:
    config.add_argument("--config", default=None, metavar="FILE",
                        help=f"a TOML config file (default: {DEFAULT_CONFIG_FILE} if present)")
    config.add_argument("--reference", action="store_true",
                        help="print the table of every option (docs/CONFIG.md)")
    config.set_defaults(func=_config)


def _add_cluster(cluster: argparse.ArgumentParser) -> None:
    defaults = SimConfig()
    cluster.add_argument("--peers", type=int, default=defaults.peers,
                         help="number of daemon processes")
    _add_learning_options(cluster, measured_mu=True)
    cluster.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds to run")
    cluster.add_argument("--out", default=CLUSTER_OUT,
                         help="directory for metrics, plots, the CA and each daemon's state")
    cluster.add_argument("--eval-every", type=int, default=defaults.eval_every,
                         help="evaluate the assembled model every K rounds")
    cluster.add_argument("--eval-samples", type=int, default=None,
                         help="global test samples per evaluation (default: the task's)")
    cluster.add_argument("--no-mdns", action="store_true",
                         help="daemons find each other only by their static addresses "
                              "(default: by mDNS on 127.0.0.1 too)")
    cluster.add_argument("--sync", action="store_true",
                         help="strict synchronous rounds (default: semi-asynchronous, as "
                         "`peerd start`)")
    cluster.add_argument("--quiet", action="store_true", help="print only the final summary")
    add_msfusion_options(cluster)
    cluster.set_defaults(func=_cluster)


def _add_status(status: argparse.ArgumentParser) -> None:
    status.add_argument("--addr", default=f"127.0.0.1:{DaemonConfig().port}",
                        metavar="HOST:PORT", help="the daemon to ask")
    status.add_argument("--json", action="store_true", help="print the reply as JSON")
    # Like `peerd start`: the file, then PEERD_TLS_DIR / PEERD_INSECURE, then these flags.
    status.add_argument("--config", default=None, metavar="FILE",
                        help="a TOML config file, for tls_dir and insecure "
                             f"(default: {DEFAULT_CONFIG_FILE} if present)")
    status.add_argument("--tls-dir", dest="tls_dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="call with this device certificate: any of the cluster's will do "
                        f"(default: as `peerd start`, {DaemonConfig().tls_dir})")
    status.add_argument("--insecure", action="store_true", default=argparse.SUPPRESS,
                        help="call a daemon that runs with --insecure (default: TLS)")
    status.set_defaults(func=_status)


def _add_ca(ca: argparse.ArgumentParser) -> None:
    actions = ca.add_subparsers(dest="action", required=True, metavar="{init,issue}")
    init = actions.add_parser("init", help="create the cluster CA (once per cluster)")
    init.add_argument("--dir", default=DEFAULT_CA_DIR,
                      help="where the CA's key and certificate go")
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA: every certificate it issued stops working")
    init.set_defaults(func=_ca_init, command_parser=init)
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
    device.set_defaults(func=_ca_issue, command_parser=device)


def _add_report(report: argparse.ArgumentParser) -> None:
    report.add_argument("--state-dir", required=True, metavar="DIR",
                        help="a daemon's state dir, or a `peerd cluster` or `peerd sim` out dir")
    report.add_argument("--out", metavar="DIR",
                        help="where to write (default: STATE_DIR/report)")
    report.set_defaults(func=_report)


def _add_compare(compare: argparse.ArgumentParser) -> None:
    compare.add_argument("runs", nargs="+", metavar="DIR",
                         help="`peerd sim` or `peerd cluster` out dirs (each holds metrics.jsonl)")
    from peerd.scoring import TASK_SCORING

    defaults = ", ".join(f"{task} {scoring.metric.name} {scoring.target}"
                         for task, scoring in TASK_SCORING.items())
    compare.add_argument("--target", type=float, default=None,
                         help="the metric's target, for the FLOPs-to-target column (default: "
                              f"the task's, {defaults})")
    compare.add_argument("--out", default=None, metavar="FILE",
                         help="the plot of their curves (default: compare.png in the first DIR)")
    compare.set_defaults(func=_compare)


def _add_export(export: argparse.ArgumentParser) -> None:
    export.add_argument("--from", dest="run_dir", required=True, metavar="DIR",
                        help="a `peerd sim` or `peerd cluster` out dir")
    export.add_argument("--out", required=True, metavar="FILE",
                        help="where to write the model (a .safetensors file)")
    export.set_defaults(func=_export)


def _add_bench(bench: argparse.ArgumentParser) -> None:
    from peerd.bench.accuracy import add_accuracy_parser
    from peerd.bench.capacity import add_capacity_parser
    from peerd.bench.compute import add_compute_parser
    from peerd.bench.exchange import add_exchange_parser
    from peerd.bench.memory import add_memory_parser
    from peerd.bench.scale import add_scale_parser
    from peerd.bench.stragglers import add_stragglers_parser
    from peerd.bench.wire import add_wire_parser

    benchmarks = bench.add_subparsers(dest="benchmark", required=True)
    for add in (add_wire_parser, add_exchange_parser, add_compute_parser, add_scale_parser,
                add_stragglers_parser, add_memory_parser, add_accuracy_parser,
                add_capacity_parser):
        add(benchmarks)
    for parser in benchmarks.choices.values():
        parser.set_defaults(command_parser=parser)


# Every command: its one line of help, its description, and the function that adds its
# arguments (imports included: only the command being run pays for its modules).
COMMANDS: dict[str, tuple[str, str | None, Callable[[argparse.ArgumentParser], None]]] = {
    "sim": ("train N peers in one process over an in-memory transport",
            "Run N peers in one process: the algorithm without a network.", _add_sim),
    "start": ("run one daemon: discover peers, train slices, exchange them",
              "Run one peerd daemon. Daemons on one LAN find each other by mDNS. Options come "
              f"from the config file (--config, else {DEFAULT_CONFIG_FILE} if present), then "
              "PEERD_* environment variables, then these flags.", _add_start),
    "cluster": ("start N real daemons on loopback and watch them learn",
                "Start N peerd daemon processes on this machine (real gRPC, real mDNS on "
                "127.0.0.1), evaluate the global model assembled from their slices, write "
                "metrics.", _add_cluster),
    "status": ("one daemon's view of the cluster", None, _add_status),
    "ca": ("the cluster's certificate authority: create it, issue device certificates",
           "Daemons accept only peers with a certificate from the cluster's CA, whose name is "
           "the peer id. Create the CA once, on one trusted machine; issue one certificate per "
           "device and copy its directory to the device. See docs/SECURITY.md.", _add_ca),
    "config": ("show the effective daemon configuration, or the reference table", None,
               _add_config),
    "report": ("plots and a summary of a daemon's (or a cluster or sim run's) rounds", None,
               _add_report),
    "compare": ("several sim or cluster runs side by side: a table and one plot", None,
                _add_compare),
    "export": ("the trained global model of a sim or cluster run, as a safetensors file",
               "Write the assembled full model of DIR's last evaluation (the one whose "
               "global_acc metrics.jsonl reports last): its whole state_dict, which the model's "
               "class loads with load_state_dict(safetensors.torch.load_file(FILE), "
               "strict=True).", _add_export),
    "bench": ("measure peerd: see BENCHMARKS.md", None, _add_bench),
}
# Their usage lines would list dozens of options: errors show this and point to --help.
LONG_USAGE = {"sim", "start", "cluster"}


def _selected_command(argv: Sequence[str]) -> str | None:
    """The command named on the line: the first word that is not an option."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None, every: bool = True) -> argparse.ArgumentParser:
    """The whole parser, or (every False) only `command`'s arguments, the others listed."""
    parser = _Parser(
        prog="peerd", description="Serverless decentralized training of overlapping sub-models.",
    )
    parser.add_argument("--version", action="version", version=f"peerd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, description, add_arguments) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=description or help_text,
                                  usage="%(prog)s [OPTIONS]" if name in LONG_USAGE else None)
        sub.set_defaults(command_parser=sub)
        if every or name == command:
            add_arguments(sub)
    return parser


def _sim(args: argparse.Namespace) -> int:
    console = Console(enabled=not args.quiet)
    try:
        return _run_sim(args, console)
    finally:
        console.close()


def _run_sim(args: argparse.Namespace, console: Console) -> int:
    console.status("loading torch")
    config = SimConfig(
        peers=args.peers, topology=args.topology, method=args.method, mu=args.mu,
        task=args.task, rounds=args.rounds, seed=args.seed, partition=args.partition,
        data_dir=args.data_dir, label_column=args.label_column, out=args.out,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples, wire_dtype=args.wire_dtype, depth=args.depth,
        train=train_config(args), overlap=args.overlap, drift_period=args.drift_period,
        learned_width=args.learned_width, width_epochs=args.width_epochs,
        width_penalty=args.width_penalty,
    )
    from peerd.sim import run

    records = run(config, _round_printer(console, config.rounds), console=console)
    console.close()
    _print_summary(records, config.rounds, config.out)
    return 0


def _temperature(args: argparse.Namespace) -> float | None:
    return None if args.no_distill else args.distill_temperature


def _round_printer(console: Console, rounds: int) -> Callable[[dict], None]:
    return lambda record: console.say(global_round_line(record, rounds))


def _print_summary(records: list[dict], rounds: int, out: str) -> None:
    final = records[-1]
    summary = f"done: {rounds} rounds, global_acc {final['global_acc']:.4f}"
    if "global_ppl" in final:
        summary += f", global_ppl {final['global_ppl']:.2f}"
    print(f"{summary}, coverage {final['coverage']:.4f}; metrics in {out}/metrics.jsonl, "
          f"learning curves in {out}/curves.png")


def _daemon_config(args: argparse.Namespace) -> DaemonConfig:
    flags = {f.name: getattr(args, f.name) for f in daemon_options() if hasattr(args, f.name)}
    if "peers" in flags:
        flags["peers"] = tuple(flags["peers"])
    return load_daemon_config(args.config, os.environ, flags)


class _ConsoleHandler(logging.Handler):
    """On a terminal the daemon's log goes to the live line: warnings stay, the rest is the
    current phase."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.console.say(f"{record.levelname.lower()}: {text}")
        else:
            self.console.status(text)


def _start(args: argparse.Namespace) -> int:
    config = _daemon_config(args)
    # On a terminal a live line shows what the daemon is doing and a line per round; under
    # systemd (no terminal) every event is one log line for the journal.
    interactive = sys.stderr.isatty() and config.log_level == "INFO"
    console = Console(enabled=interactive)
    if interactive:
        logging.basicConfig(level="INFO", handlers=[_ConsoleHandler(console)])
    else:
        logging.basicConfig(level=config.log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("peerd.start")
    log.info("starting: loading torch and the %s data", config.task)
    from peerd.daemon import serve

    try:
        summary = serve(config, console if interactive else None)
    finally:
        console.close()
    print(f"{summary.peer_id}: {summary.rounds_done} rounds, {summary.members} members, "
          f"train loss {summary.train_loss:.4f}, sent {summary.bytes_sent} B, "
          f"received {summary.bytes_received} B")
    return 0


def peerd_command() -> str:
    """This peerd as a command that runs from any shell, whatever its PATH: the absolute path
    of the running `peerd` script (or of its Python, with -m peerd.cli)."""
    import shlex

    script = Path(sys.executable).with_name("peerd")
    if script.is_file():
        return shlex.quote(str(script.absolute()))
    return f"{shlex.quote(str(Path(sys.executable).absolute()))} -m peerd.cli"


def _cluster(args: argparse.Namespace) -> int:
    console = Console(enabled=not args.quiet)
    try:
        return _run_cluster(args, console)
    finally:
        console.close()


def _run_cluster(args: argparse.Namespace, console: Console) -> int:
    if args.memory_budget is not None:
        parse_size(args.memory_budget, "memory_budget")
        if args.mu != AUTO:
            raise ConfigError("--memory-budget is only used with --mu auto")
    check_depth(args.depth, args.early_exits)
    console.status("loading torch")
    from peerd.cluster import ClusterConfig, run_cluster

    config = ClusterConfig(
        peers=args.peers, topology=args.topology, method=args.method, mu=args.mu,
        memory_budget=args.memory_budget, task=args.task, rounds=args.rounds, seed=args.seed,
        partition=args.partition,
        data_dir=args.data_dir, label_column=args.label_column, out=args.out,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples, mdns=not args.no_mdns, wire_dtype=args.wire_dtype,
        sync=args.sync, depth=args.depth, early_exits=args.early_exits,
        distill_temperature=_temperature(args), overlap=args.overlap,
        drift_period=args.drift_period, contrastive=args.contrastive,
        contrastive_weight=args.contrastive_weight, contrastive_tau=args.contrastive_tau,
        learned_width=args.learned_width, width_epochs=args.width_epochs,
        width_penalty=args.width_penalty,
    )
    peerd = peerd_command()

    def announce(daemons: list[DaemonProcess]) -> None:
        console.say(f"started {len(daemons)} daemons; while they run, in another terminal:")
        for daemon in daemons:
            console.say(f"  {daemon.peer_id}: {peerd} status --addr {daemon.address} "
                        f"--tls-dir {daemon.tls_dir.absolute()}   "
                        f"page {daemon.page_url}   metrics {daemon.metrics_url}   "
                        f"log {daemon.state_dir.absolute()}/daemon.log")

    def announce_page(url: str) -> None:
        console.say(f"cluster page: {url}")

    records = run_cluster(config, _round_printer(console, config.rounds), announce, console,
                          announce_page)
    console.close()
    _print_summary(records, config.rounds, config.out)
    print(f"plots of every daemon: {peerd} report --state-dir {Path(config.out).absolute()}")
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
    import grpc

    from peerd.net.codec import WireError
    from peerd.net.tls import TlsIdentity
    from peerd.ops.status import show_status

    config = _daemon_config(args)
    tls = None if config.insecure else TlsIdentity.load(config.tls_dir)
    try:
        print(show_status(args.addr, args.json, tls))
    except (grpc.aio.AioRpcError, WireError) as error:
        detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else error.detail
        print(f"peerd status: error: no daemon answers at {args.addr}: {detail}",
              file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from peerd.ops.report import ReportError, build_report

    try:
        summary, paths = build_report(Path(args.state_dir), args.out and Path(args.out))
    except ReportError as error:
        print(f"peerd report: error: {error}", file=sys.stderr)
        return 2
    print(summary, end="")
    for path in paths:
        print(f"wrote {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from peerd.ops.compare import compare_runs
    from peerd.ops.report import ReportError

    try:
        table, plot = compare_runs([Path(run) for run in args.runs], args.target,
                                   args.out and Path(args.out))
    except ReportError as error:
        print(f"peerd compare: error: {error}", file=sys.stderr)
        return 2
    print(table, end="")
    print(f"wrote {plot}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from peerd.global_model import export_model

    exported = export_model(Path(args.run_dir), Path(args.out))
    acc = "" if exported.global_acc is None else f", global_acc {exported.global_acc:.4f}"
    print(f"wrote {exported.path}: the {exported.task} model after round "
          f"{exported.round_number}{acc}; {exported.tensors} tensors, {exported.values} values")
    return 0


def _ca_init(args: argparse.Namespace) -> int:
    from peerd.ops.ca import init_ca

    ca_dir = init_ca(Path(args.dir), force=args.force)
    print(f"created the cluster CA in {ca_dir}/: ca.crt (the certificate: public) and ca.key "
          f"(the private key, mode 0600: keep it on this machine only, and back it up)\n"
          f"next, for each device: {peerd_command()} ca issue NAME --dir {ca_dir.absolute()}")
    return 0


def _ca_issue(args: argparse.Namespace) -> int:
    from peerd.ops.ca import issue

    device = issue(Path(args.dir), args.name, Path(args.out) if args.out else None, args.force,
                   args.role)
    print(f"issued peer id {device.peer_id}: {', '.join(str(p) for p in device.files)} "
          f"({DEVICE_KEY} has mode 0600)\n"
          f"copy these three files, keeping their names, to the device {device.peer_id}: "
          f"into /etc/peerd/tls/ for the systemd service (docs/SYSTEMD.md), or into the "
          f"directory `peerd start --tls-dir DIR` names (default: ./{DaemonConfig().tls_dir}); "
          f"the daemon takes its peer id from the certificate")
    return 0


def _known_errors() -> tuple[type[Exception], ...]:
    """The errors that are the user's to fix: printed as one line, never a traceback."""
    from peerd.data import DatasetMissing

    errors: list[type[Exception]] = [ConfigError, DatasetMissing, ValueError]
    if "peerd.cluster" in sys.modules:
        errors.append(sys.modules["peerd.cluster"].ClusterError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_selected_command(argv), every=False)
    args, extras = parser.parse_known_args(argv)
    if extras:
        # The subcommand's own usage, not the top level's, for a misspelt option.
        args.command_parser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        return args.func(args)
    except Exception as error:
        if not isinstance(error, _known_errors()):
            raise
        print(f"peerd {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
