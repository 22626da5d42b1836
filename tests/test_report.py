"""`peerd report`: plots and summary of a daemon's (or a cluster run's) rounds, and its errors."""

from __future__ import annotations

import json
import math
from itertools import accumulate
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from peerd.cli import main as run_cli
from peerd.ops.report import (
    ReportError,
    _bytes_per_round,
    down_spans,
    last_run,
    load_peers,
    membership_changes,
    peer_summary,
    plot_members,
    with_gaps,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PEER_PLOTS = ("loss_accuracy.png", "bytes.png", "peers.png")

# One daemon's six rounds: a fourth member joins for round 4; best loss and accuracy at round 4.
TRAIN_LOSS = [2.0, 1.5, 1.2, 0.7, 1.0, 0.8]
LOCAL_ACC = [0.1, 0.3, 0.5, 0.65, 0.55, 0.6]
SENT = [1000, 1200, 1100, 1500, 1500, 1500]  # per round; 7800 in all
RECEIVED = [900, 1000, 1000, 1400, 1600, 1600]  # 7500 in all
ROUND_S = [1.0, 2.0, 3.0, 10.0, 2.0, 2.5]  # mean 20.5 / 6 = 3.417, median (2 + 2.5) / 2
MEMBERS = [3, 3, 3, 4, 4, 4]
TRAIN_FLOPS = 3_000_000_000  # per round: 1.8e10 over six


def rounds(peer_id: str = "peer-00", scale: float = 1.0, first_round: int = 1) -> list[dict]:
    records, wall = [], 0.0
    for index, (sent, received) in enumerate(zip(accumulate(SENT), accumulate(RECEIVED),
                                                 strict=True)):
        wall += ROUND_S[index]
        records.append({
            "round": first_round + index, "peer_id": peer_id,
            "train_loss": TRAIN_LOSS[index] * scale, "local_acc": LOCAL_ACC[index],
            "local_loss": TRAIN_LOSS[index] * scale * 1.1,
            "local_ppl": math.exp(TRAIN_LOSS[index] * scale * 1.1), "samples": 1000,
            "forward_flops_per_sample": 1_000_000, "train_flops": TRAIN_FLOPS,
            "bytes_sent_cum": sent, "bytes_received_cum": received,
            "neighbours": ["peer-01", "peer-02"], "members": MEMBERS[index],
            "round_s": ROUND_S[index], "wall_s": wall,
        })
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PEER_00_SUMMARY = """\
peer-00: 6 rounds (1..6)
  train loss      first 2.0000  last 0.8000  best 0.7000 (round 4)
  local accuracy  first 0.1000  last 0.6000  best 0.6500 (round 4)
  bytes           sent 7800  received 7500
  round seconds   mean 3.417  median 2.250
  members         start 3  end 4
  train FLOPs     1.8e+10
"""


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, (path, len(data))  # axes, curves and labels, not a blank canvas


def test_one_daemon(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "rounds.jsonl", rounds())
    summary = write_report(tmp_path)
    out = tmp_path / "report"
    assert summary == PEER_00_SUMMARY
    assert (out / "summary.txt").read_text() == summary
    for name in PEER_PLOTS:
        assert_png(out / name)
    assert not (out / "global.png").exists()


def test_only_the_last_run_of_an_appended_file() -> None:
    # The daemon appends: a restart begins again at round 1 ...
    earlier = rounds(scale=3.0)[:4]
    assert last_run(earlier + rounds()) == rounds()
    assert peer_summary("peer-00", last_run(earlier + rounds())) == (
        PEER_00_SUMMARY.splitlines())
    # ... and a rejoin at a later round with its byte totals starting from 0.
    rejoined = rounds(first_round=3)
    assert last_run(rounds()[:2] + rejoined) == rejoined
    assert last_run(rounds()) == rounds()


def test_cluster_dir(tmp_path: Path) -> None:
    for position, scale in enumerate((1.0, 0.5, 2.0)):
        write_jsonl(tmp_path / f"peer-{position:02d}" / "rounds.jsonl",
                    rounds(f"peer-{position:02d}", scale))
    (tmp_path / "peer-03").mkdir()  # a daemon that never finished a round
    identity = {"task": "digits", "method": "msfusion", "topology": "ring", "peers": 4,
                "mu": 0.5, "seed": 0}
    global_acc = [None, 0.42, None, 0.71, None, 0.68]  # evaluated every second round
    metrics = [{
        "round": index + 1, **identity, "train_loss_mean": 1.0,
        "train_flops_cum_peer_mean": TRAIN_FLOPS * (index + 1), "coverage": 0.5 + index / 20,
        "global_acc": acc, "peer_acc_mean": acc, "wall_s": index + 1.0,
    } for index, acc in enumerate(global_acc)]
    write_jsonl(tmp_path / "metrics.jsonl", metrics)

    summary = write_report(tmp_path, tmp_path / "report")
    assert summary.startswith(PEER_00_SUMMARY)
    assert ("peer-01: 6 rounds (1..6)\n"
            "  train loss      first 1.0000  last 0.4000  best 0.3500 (round 4)\n") in summary
    assert "peer-02: 6 rounds (1..6)\n  train loss      first 4.0000" in summary
    assert summary.endswith(
        "peer-03: no rounds\n"
        "global (metrics.jsonl): 6 rounds, 3 evaluated\n"
        "  global accuracy first 0.4200  last 0.6800  best 0.7100 (round 4)\n"
        "  train FLOPs per peer 1.8e+10\n"
        "  coverage        0.7500\n")
    for name in (*PEER_PLOTS, "global.png"):
        assert_png(tmp_path / "report" / name)


def test_sim_dir_gets_the_global_part(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "metrics.jsonl", [{
        "round": r, "train_flops_cum_peer_mean": 1e9 * r, "global_acc": 0.1 * r,
        "global_ppl": 30.0 / r,
    } for r in (1, 2, 3)])
    summary = write_report(tmp_path)
    assert summary == ("global (metrics.jsonl): 3 rounds, 3 evaluated\n"
                       "  global accuracy first 0.1000  last 0.3000  best 0.3000 (round 3)\n"
                       "  global ppl      first 30.00  last 10.00  best 10.00 (round 3)\n"
                       "  train FLOPs per peer 3e+09\n")
    assert_png(tmp_path / "report" / "global.png")
    assert not (tmp_path / "report" / "loss_accuracy.png").exists()


def test_nan_accuracy_is_not_best() -> None:
    records = rounds()
    records[3]["local_acc"] = math.nan  # a peer with an empty test split evaluates to NaN
    assert "best 0.6000 (round 6)" in peer_summary("peer-00", records)[2]


@pytest.mark.parametrize(("content", "message"), [
    ("", "no records"),
    ("\n\n", "no records"),
    ("{}\n", "line 1 lacks round, train_loss"),
    (json.dumps(rounds()[0]) + "\n\n{not json\n", "line 3 is not JSON"),
    (json.dumps(rounds()[0]) + "\n[1, 2]\n", "line 2 is not a JSON object"),
])
def test_malformed_rounds_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "rounds.jsonl").write_text(content)
    with pytest.raises(ReportError, match=message) as error:
        write_report(tmp_path)
    assert str(tmp_path / "rounds.jsonl") in str(error.value)
    assert not (tmp_path / "report").exists()  # nothing written for bad input


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"rounds\.jsonl: no such file"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="nowhere: no such directory"):
        write_report(tmp_path / "nowhere")
    write_jsonl(tmp_path / "peer-00" / "rounds.jsonl", rounds())
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl: line 1 lacks train_flops_cum"):
        write_report(tmp_path)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_jsonl(tmp_path / "state" / "rounds.jsonl", rounds())
    out = tmp_path / "plots"
    assert run_cli(["report", "--state-dir", str(tmp_path / "state"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(PEER_00_SUMMARY)
    for name in (*PEER_PLOTS, "summary.txt"):
        assert f"wrote {out / name}\n" in printed

    assert run_cli(["report", "--state-dir", str(tmp_path / "empty")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_down_time_is_a_gap_and_joins_and_leaves_are_marked(tmp_path: Path) -> None:
    # peer-01 ran rounds 1-2, was down, and rejoined at round 5 with its byte totals from 0.
    down = rounds("peer-01")[:2] + rounds("peer-01", first_round=5)[:2]
    write_jsonl(tmp_path / "peer-00" / "rounds.jsonl", rounds())
    write_jsonl(tmp_path / "peer-01" / "rounds.jsonl", down)
    write_jsonl(tmp_path / "metrics.jsonl", [
        {"round": n, "train_flops_cum_peer_mean": n * TRAIN_FLOPS, "global_acc": 0.1 * n,
         "train_loss_mean": 2.0 / n} for n in range(1, 7)])
    peers, _ = load_peers(tmp_path)
    assert [r["round"] for r in peers["peer-01"]] == [1, 2, 5, 6]  # both runs are plotted
    assert down_spans(peers["peer-01"]) == [(2, 5)]
    xs, ys = with_gaps(peers["peer-01"], [1, 2, 5, 6], [10.0, 11.0, 12.0, 13.0])
    assert xs[:2] == [1, 2] and math.isnan(xs[2]) and math.isnan(ys[2]) and xs[3:] == [5, 6]
    assert membership_changes(rounds()) == ([(4, 4)], [])
    assert membership_changes(rounds()[3:] + rounds()[:1]) == ([], [(1, 3)])

    figure = Figure()
    axis = figure.subplots()
    plot_members(axis, peers)
    lines = {line.get_label(): line for line in axis.get_lines()}
    x_down = list(lines["peer-01"].get_xdata())
    assert math.isnan(x_down[2]) and [x_down[i] for i in (0, 1, 3, 4)] == [1, 2, 5, 6]
    assert axis.get_ylim() == (0.0, 5.0)  # from 0 members, above the largest view (4)
    assert {"member joined", "rounds missed", "peer-00", "peer-01"} <= set(
        axis.get_legend_handles_labels()[1])
    assert all(float(tick).is_integer() for tick in axis.get_xticks())

    write_report(tmp_path)  # and the whole report draws it
    assert_png(tmp_path / "report" / "peers.png")
    # bytes per round start again at 0 with the rejoined run: its first round sent 1000 B.
    assert _bytes_per_round("bytes_sent_cum")(peers["peer-01"]) == [1000, 1200, 1000, 1200]
