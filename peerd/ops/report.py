"""`peerd report`: plots and a text summary of a daemon's rounds.jsonl after (or during) a run.

STATE_DIR is either one daemon's state dir (rounds.jsonl) or a `peerd cluster` out dir
(metrics.jsonl plus peer-NN/rounds.jsonl); for the latter every peer gets its own line in each
plot and its own block in the summary, and the assembled model's figures are added. A `peerd
sim` out dir (metrics.jsonl alone) gets the assembled model's part only.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from itertools import accumulate, pairwise
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from peerd.ops.plots import plot_curves

ROUNDS_FILE = "rounds.jsonl"
METRICS_FILE = "metrics.jsonl"
ROUND_FIELDS = ("round", "train_loss", "local_acc", "train_flops", "bytes_sent_cum",
                "bytes_received_cum", "round_s")
METRICS_FIELDS = ("round", "train_flops_cum_peer_mean", "global_acc")
MAX_LEGEND_PEERS = 12  # beyond this a legend hides the curves it labels


class ReportError(ValueError):
    """Unreadable input; the message names the file (and line)."""


def read_jsonl(path: Path, fields: Sequence[str]) -> list[dict]:
    """Every record of a JSON-lines file, each checked for `fields`."""
    if not path.is_file():
        raise ReportError(f"{path}: no such file")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}: line {number} is not a JSON object")
        missing = [field for field in fields if field not in record]
        if missing:
            raise ReportError(f"{path}: line {number} lacks {', '.join(missing)}")
        records.append(record)
    if not records:
        raise ReportError(f"{path}: no records (empty file)")
    return records


def split_runs(records: list[dict]) -> list[list[dict]]:
    """The file's daemon runs, in order.

    The daemon appends and never rewrites: a restarted (or rejoining) daemon starts again at
    round 1, its checkpoint's round or its join round with zeroed byte totals, so a new run
    begins wherever the round number or a cumulative byte total stops increasing.
    """
    runs = [[records[0]]] if records else []
    for before, now in pairwise(records):
        if (now["round"] <= before["round"]
                or now["bytes_sent_cum"] < before["bytes_sent_cum"]
                or now["bytes_received_cum"] < before["bytes_received_cum"]):
            runs.append([now])
        else:
            runs[-1].append(now)
    return runs


def last_run(records: list[dict]) -> list[dict]:
    """The records of the file's last daemon run (split_runs)."""
    return split_runs(records)[-1]


def history(records: list[dict]) -> list[dict]:
    """The last run and the runs before it that it continues (the daemon was down, then
    resumed or rejoined at a later round): what the plots show, gaps included. A run that
    starts over from an earlier round ends the history before it."""
    runs = split_runs(records)
    kept = [runs[-1]]
    for run in reversed(runs[:-1]):
        if run[-1]["round"] >= kept[0][0]["round"]:
            break
        kept.insert(0, run)
    return [record for run in kept for record in run]


def load_peers(state_dir: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """Per peer its history's records, plus the cluster peer dirs that have no rounds yet.

    Next to a metrics.jsonl the peers may be missing altogether: a `peerd sim` out dir, which
    gets only the global part of the report.
    """
    if not state_dir.is_dir():
        raise ReportError(f"{state_dir}: no such directory")
    own = state_dir / ROUNDS_FILE
    if own.exists() or not (state_dir / METRICS_FILE).exists():
        records = history(read_jsonl(own, ROUND_FIELDS))
        return {records[-1].get("peer_id", state_dir.name): records}, []
    peers, without = {}, []
    for peer_dir in sorted(p for p in state_dir.glob("peer-*") if p.is_dir()):
        path = peer_dir / ROUNDS_FILE
        # A daemon writes its file at its first completed round; a peer that died before
        # that must not hide the others.
        if path.exists():
            peers[peer_dir.name] = history(read_jsonl(path, ROUND_FIELDS))
        else:
            without.append(peer_dir.name)
    return peers, without


def per_round(cumulative_values: Sequence[int]) -> list[int]:
    """Increments of a cumulative series; the first round's is its total (a run starts at 0)."""
    return [now - before for now, before in zip(cumulative_values,
                                                 [0, *cumulative_values[:-1]], strict=True)]


def _best(records: Sequence[dict], field: str, pick: Callable[..., dict],
          spec: str = ".4f") -> str:
    """`value (round N)` of the best finite value, or n/a when there is none."""
    candidates = [r for r in records if r.get(field) is not None and math.isfinite(r[field])]
    if not candidates:
        return "n/a"
    best = pick(candidates, key=lambda r: r[field])
    return f"{best[field]:{spec}} (round {best['round']})"


def _members(record: dict) -> str:
    # Daemons before the per-round member count did not record it.
    return str(record["members"]) if "members" in record else "n/a"


def peer_summary(peer_id: str, records: list[dict]) -> list[str]:
    first, last = records[0], records[-1]
    seconds = [r["round_s"] for r in records]
    return [
        f"{peer_id}: {len(records)} rounds ({first['round']}..{last['round']})",
        f"  train loss      first {first['train_loss']:.4f}  last {last['train_loss']:.4f}  "
        f"best {_best(records, 'train_loss', min)}",
        f"  local accuracy  first {first['local_acc']:.4f}  last {last['local_acc']:.4f}  "
        f"best {_best(records, 'local_acc', max)}",
        f"  bytes           sent {last['bytes_sent_cum']}  "
        f"received {last['bytes_received_cum']}",
        f"  round seconds   mean {statistics.fmean(seconds):.3f}  "
        f"median {statistics.median(seconds):.3f}",
        f"  members         start {_members(first)}  end {_members(last)}",
        f"  train FLOPs     {sum(r['train_flops'] for r in records):.4g}",
    ]


def global_summary(records: list[dict]) -> list[str]:
    evaluated = [r for r in records if r.get("global_acc") is not None]
    lines = [f"global ({METRICS_FILE}): {len(records)} rounds, {len(evaluated)} evaluated"]
    if evaluated:
        first, last = evaluated[0], evaluated[-1]
        lines.append(f"  global accuracy first {first['global_acc']:.4f}  "
                     f"last {last['global_acc']:.4f}  best {_best(evaluated, 'global_acc', max)}")
        if "global_ppl" in last:
            lines.append(f"  global ppl      first {first['global_ppl']:.2f}  "
                         f"last {last['global_ppl']:.2f}  "
                         f"best {_best(evaluated, 'global_ppl', min, '.2f')}")
    final = records[-1]
    lines.append(f"  train FLOPs per peer {final['train_flops_cum_peer_mean']:.4g}")
    if "coverage" in final:
        lines.append(f"  coverage        {final['coverage']:.4f}")
    return lines


def with_gaps(records: Sequence[dict], x: Sequence[float], y: Sequence[float]
              ) -> tuple[list[float], list[float]]:
    """The points (x, y) of the records, with a NaN point wherever rounds are missing (the
    daemon was down, or skipped rounds to catch up): matplotlib breaks the line there instead
    of drawing one straight across."""
    xs: list[float] = []
    ys: list[float] = []
    for index, record in enumerate(records):
        if index and record["round"] != records[index - 1]["round"] + 1:
            xs.append(math.nan)
            ys.append(math.nan)
        xs.append(x[index])
        ys.append(y[index])
    return xs, ys


def _series(axis: Axes, peers: dict[str, list[dict]], x: Callable[[list[dict]], Sequence],
            y: Callable[[list[dict]], Sequence], xlabel: str, ylabel: str) -> None:
    for peer_id, records in peers.items():
        axis.plot(*with_gaps(records, x(records), y(records)), marker=".", label=peer_id)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if x is _rounds:  # no round 2.5 ticks
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if 1 < len(peers) <= MAX_LEGEND_PEERS:
        axis.legend(fontsize="small")


def membership_changes(records: Sequence[dict]) -> tuple[list[tuple[int, int]],
                                                         list[tuple[int, int]]]:
    """(round, members) where this daemon's view grew (a member joined) and where it shrank
    (one left or was dropped), from one round to the next."""
    joins, leaves = [], []
    for before, now in pairwise(records):
        if "members" not in before or "members" not in now:
            continue
        if now["members"] > before["members"]:
            joins.append((now["round"], now["members"]))
        elif now["members"] < before["members"]:
            leaves.append((now["round"], now["members"]))
    return joins, leaves


def down_spans(records: Sequence[dict]) -> list[tuple[int, int]]:
    """(last round before, first round after) of each stretch of rounds this daemon missed."""
    return [(before["round"], now["round"]) for before, now in pairwise(records)
            if now["round"] > before["round"] + 1]


def plot_members(axis: Axes, peers: dict[str, list[dict]]) -> None:
    """Members of each daemon's view by round, joins and leaves marked, missed rounds shaded;
    the axis starts at 0 members."""
    _series(axis, peers, _rounds, _field("members"), "round", "members of the view")
    marks = {"member joined": ("^", "tab:green", 0), "member left": ("v", "tab:red", 1)}
    for records in peers.values():
        changes = membership_changes(records)
        for label, (marker, colour, which) in marks.items():
            if changes[which]:
                rounds, members = zip(*changes[which], strict=True)
                axis.scatter(rounds, members, marker=marker, color=colour, s=80, zorder=3,
                             label=label)
        for before, after in down_spans(records):
            axis.axvspan(before, after, color="grey", alpha=0.2, label="rounds missed")
    top = max((r.get("members") or 0 for records in peers.values() for r in records),
              default=1)
    axis.set_ylim(0, top + 1)
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per kind of mark
    if len(unique) > 1 and len(peers) <= MAX_LEGEND_PEERS:
        axis.legend(unique.values(), unique.keys(), fontsize="small")


def _rounds(records: list[dict]) -> list[int]:
    return [r["round"] for r in records]


def _flops(records: list[dict]) -> list[int]:
    return list(accumulate(r["train_flops"] for r in records))


def _bytes_per_round(field: str) -> Callable[[list[dict]], list[int]]:
    """Per-round increments of a cumulative byte total, which starts again at 0 each run."""
    return lambda records: [value for run in split_runs(records)
                            for value in per_round([r[field] for r in run])]


def _field(name: str) -> Callable[[list[dict]], list[float]]:
    # NaN, not None, for absent values: matplotlib leaves a gap either way, but NaN keeps the
    # array numeric.
    return lambda records: [math.nan if r.get(name) is None else r[name] for r in records]


def _save(figure: Figure, path: Path, title: str) -> None:
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_peers(peers: dict[str, list[dict]], out_dir: Path, title: str) -> list[Path]:
    """loss_accuracy.png, bytes.png and peers.png; returns their paths."""
    # Figure objects, not pyplot: no global figure registry to leak or to share across threads.
    figure = Figure(figsize=(10, 7))
    axes = figure.subplots(2, 2)
    flops_label = "cumulative training FLOPs (this peer)"
    for row, (name, label) in enumerate((("train_loss", "train loss"),
                                         ("local_acc", "local accuracy"))):
        _series(axes[row][0], peers, _rounds, _field(name), "round", label)
        _series(axes[row][1], peers, _flops, _field(name), flops_label, label)
    loss_accuracy = out_dir / "loss_accuracy.png"
    _save(figure, loss_accuracy, title)

    figure = Figure(figsize=(10, 4))
    sent_axis, received_axis = figure.subplots(1, 2)
    for axis, field, label in ((sent_axis, "bytes_sent_cum", "bytes sent per round"),
                               (received_axis, "bytes_received_cum",
                                "bytes received per round")):
        _series(axis, peers, _rounds, _bytes_per_round(field), "round", label)
    traffic = out_dir / "bytes.png"
    _save(figure, traffic, title)

    figure = Figure(figsize=(6, 4))
    plot_members(figure.subplots(), peers)
    membership = out_dir / "peers.png"
    _save(figure, membership, title)
    return [loss_accuracy, traffic, membership]


def _run_title(record: dict) -> str:
    return (f"{record.get('method', '?')} mu={record.get('mu', '?')} {record.get('task', '?')}, "
            f"{record.get('peers', '?')} peers")


def build_report(state_dir: Path, out_dir: Path | None = None) -> tuple[str, list[Path]]:
    """write_report, also returning the paths it wrote."""
    state_dir = Path(state_dir)
    out_dir = Path(out_dir) if out_dir is not None else state_dir / "report"
    peers, without = load_peers(state_dir)
    metrics_path = state_dir / METRICS_FILE
    metrics = read_jsonl(metrics_path, METRICS_FIELDS) if metrics_path.exists() else None
    out_dir.mkdir(parents=True, exist_ok=True)

    title = _run_title(metrics[0]) if metrics else next(iter(peers))
    paths = plot_peers(peers, out_dir, title) if peers else []
    lines = []
    for peer_id, records in peers.items():
        lines += peer_summary(peer_id, last_run(records))
    lines += [f"{peer_id}: no rounds" for peer_id in without]
    if metrics is not None:
        plot_curves(metrics, out_dir / "global.png", title)
        paths.append(out_dir / "global.png")
        lines += global_summary(metrics)
    summary = "\n".join(lines) + "\n"
    summary_path = out_dir / "summary.txt"
    summary_path.write_text(summary)
    paths.append(summary_path)
    return summary, paths


def write_report(state_dir: Path, out_dir: Path | None = None) -> str:
    """Write the plots and summary.txt into out_dir (default STATE_DIR/report); returns the
    summary. Raises ReportError for missing or malformed input."""
    return build_report(state_dir, out_dir)[0]
