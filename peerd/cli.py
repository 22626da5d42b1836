"""Command-line parsing only: every command hands a typed config to one function elsewhere.

Start-up is kept short: a command's parser is built, and its modules imported, only for the
command being run, so `peerd --help`, `--version`, `status`, `ca`, `config`, `report` and
`compare` never load torch (tests/test_first_minutes.py checks it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from peerd import __version__
from peerd.config import (
    DEFAULT_CONFIG_FILE,
    ClusterConfig,
    ConfigError,
    DaemonConfig,
    SimConfig,
    config_lines,
    load_daemon_config,
    reference_table,
)
from peerd.ops.ca import DEFAULT_CA_DIR, DEVICE_KEY, DEVICE_ROLE, ROLES
from peerd.ops.progress import Console, global_round_line
from peerd.options import (
    check_value,
    field_type,
    option_default,
    option_fields,
    option_flag,
    parse_text,
    required_type,
    shown_default,
    spec_of,
)

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


def add_option_flags(parser: argparse.ArgumentParser, config_class: type,
                     layered: bool = False) -> None:
    """One flag per declared option of `config_class` (peerd/config.py). `layered` (start):
    a flag not given leaves the option to the config file, the environment and the default."""
    for option_field in option_fields(config_class):
        name, flag, spec = option_field.name, option_flag(option_field), spec_of(option_field)
        default = option_default(option_field)
        shown = argparse.SUPPRESS if layered else default
        kind = required_type(field_type(config_class, name))
        if kind is bool and default:
            parser.add_argument(flag, dest=name, action="store_false", default=shown,
                                help=spec.off_help)
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=shown, help=_help(spec.help, default))
        elif kind == tuple[str, ...]:
            parser.add_argument(flag, dest=name, action="append", default=shown,
                                metavar=spec.metavar, help=_help(spec.help, default))
        else:
            parser.add_argument(flag, dest=name, type=_flag_parser(config_class, name),
                                default=shown, choices=spec.choices, metavar=spec.metavar,
                                help=_help(spec.help, default))


def _help(help_text: str, default: object) -> str:
    """An option's help with its default, unless the text already says it."""
    if "default" in help_text:
        return help_text.replace("%", "%%")
    return f"{help_text} (default: {shown_default(default)})".replace("%", "%%")


def _flag_parser(config_class: type, name: str) -> Callable[[str], object]:
    """A flag's value, checked against the option's rule as soon as it is read."""
    option_field = next(f for f in option_fields(config_class) if f.name == name)

    def parse(text: str) -> object:
        try:
            value = parse_text(config_class, name, text)
            if spec_of(option_field).choices is None:  # argparse says "invalid choice"
                check_value(option_field, value)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return parse


def config_from_args(config_class: type, args: argparse.Namespace) -> object:
    """The `sim` or `cluster` configuration its flags give."""
    return config_class(**{f.name: getattr(args, f.name) for f in option_fields(config_class)})


def _add_sim(sim: argparse.ArgumentParser) -> None:
    add_option_flags(sim, SimConfig)
    sim.add_argument("--quiet", action="store_true", help="print only the final summary")
    sim.set_defaults(func=_sim)


def _add_start(start: argparse.ArgumentParser) -> None:
    start.add_argument("--config", default=None, metavar="FILE",
                       help=f"a TOML config file (default: {DEFAULT_CONFIG_FILE} if present)")
    # Given flags override the file and the environment.
    add_option_flags(start, DaemonConfig, layered=True)
    start.set_defaults(func=_start)


def _add_config(config: argparse.ArgumentParser) -> None:
    config.add_argument("--config", default=None, metavar="FILE",
                        help=f"a TOML config file (default: {DEFAULT_CONFIG_FILE} if present)")
    config.add_argument("--reference", action="store_true",
                        help="print the table of every option (docs/CONFIG.md)")
    config.set_defaults(func=_config)


def _add_cluster(cluster: argparse.ArgumentParser) -> None:
    add_option_flags(cluster, ClusterConfig)
    cluster.add_argument("--quiet", action="store_true", help="print only the final summary")
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
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="run_dir", metavar="DIR",
                        help="a finished `peerd sim` or `peerd cluster` out dir")
    source.add_argument("--addr", metavar="HOST:PORT",
                        help="a running daemon: its cluster's model is pulled from the members "
                             "it knows and assembled here")
    export.add_argument("--out", required=True, metavar="FILE",
                        help="where to write the model (a .safetensors file)")
    # With --addr, like `peerd status`: the file, then PEERD_* variables, then these flags. The
    # task and the agreed options must be the cluster's (its config file serves).
    export.add_argument("--config", default=None, metavar="FILE",
                        help="with --addr: the cluster's TOML config file, for the task, the "
                             "agreed options, tls_dir and insecure "
                             f"(default: {DEFAULT_CONFIG_FILE} if present)")
    export.add_argument("--task", default=argparse.SUPPRESS, metavar="TASK",
                        help="with --addr: the cluster's task (default: as `peerd start`)")
    export.add_argument("--tls-dir", dest="tls_dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="with --addr: call with this certificate of the cluster CA; a "
                             "reader's is enough (`peerd ca issue NAME --role reader`; "
                             f"default: as `peerd start`, {DaemonConfig().tls_dir})")
    export.add_argument("--insecure", action="store_true", default=argparse.SUPPRESS,
                        help="with --addr: call a daemon that runs with --insecure (default: "
                             "TLS)")
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
    "export": ("the trained global model of a sim or cluster run, or of a running cluster, "
               "as a safetensors file",
               "Write the assembled full model of DIR's last evaluation (the one whose "
               "global_acc metrics.jsonl reports last), or, with --addr, of the latest round "
               "every member of a running daemon's cluster has finished: its whole state_dict, "
               "which the model's class loads with "
               "load_state_dict(safetensors.torch.load_file(FILE), strict=True).", _add_export),
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
    config = config_from_args(SimConfig, args)
    from peerd.sim import run

    records = run(config, _round_printer(console, config.rounds), console=console)
    console.close()
    _print_summary(records, config.rounds, config.out)
    return 0


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
    flags = {f.name: getattr(args, f.name) for f in option_fields(DaemonConfig)
             if hasattr(args, f.name)}
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
    config = config_from_args(ClusterConfig, args)
    console.status("loading torch")
    from peerd.cluster import run_cluster

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
    for line in config_lines(_daemon_config(args)):
        print(line)
    return 0


def _status(args: argparse.Namespace) -> int:
    from peerd.net.frames import CALL_ERRORS, call_failure
    from peerd.net.tls import TlsIdentity
    from peerd.ops.status import show_status

    config = _daemon_config(args)
    tls = None if config.insecure else TlsIdentity.load(config.tls_dir)
    try:
        print(show_status(args.addr, args.json, tls))
    except CALL_ERRORS as error:
        _, detail = call_failure(error)
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
    if args.addr is not None:
        from peerd.live_model import export_live_model
        from peerd.net.tls import TlsIdentity

        config = _daemon_config(args)
        tls = None if config.insecure else TlsIdentity.load(config.tls_dir)
        exported = export_live_model(args.addr, config, tls, Path(args.out))
    else:
        from peerd.global_model import ExportError, export_model

        ignored = [f"--{name.replace('_', '-')}" for name in ("config", "task", "tls_dir",
                                                                "insecure")
                   if getattr(args, name, None) is not None]
        if ignored:
            raise ExportError(f"{', '.join(ignored)}: only with --addr (--from reads the "
                              f"model the run wrote)")
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
    if "peerd.memlimit" in sys.modules:
        errors.append(sys.modules["peerd.memlimit"].MemoryLimitError)
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
