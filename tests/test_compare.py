"""`peerd compare`: runs side by side, a table and one plot, from their metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peerd.cli import main


def write_run(directory: Path, method: str, accuracy: list[float], task: str = "digits",
              flops_per_round: float = 2e9, sent_per_round: float = 4096.0,
              perplexity: list[float] | None = None) -> Path:
    directory.mkdir(parents=True)
    records = [{
        "round": n, "task": task, "method": method, "topology": "ring", "peers": 4, "mu": 0.25,
        "seed": 0, "train_loss_mean": 1.0 / n, "train_flops_cum_peer_mean": n * flops_per_round,
        "bytes_sent_peer_mean": sent_per_round, "bytes_sent_cum_peer_mean": n * sent_per_round,
        "coverage": 1.0, "global_acc": value, "wall_s": 1.5 * n,
    } for n, value in enumerate(accuracy, start=1)]
    for record, value in zip(records, perplexity or [], strict=False):
        record["global_ppl"] = value
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def test_table_and_plot_of_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fast = write_run(tmp_path / "msfusion", "msfusion", [0.5, 0.85, 0.9])
    slow = write_run(tmp_path / "fedrolex", "fedrolex", [0.4, 0.6, 0.7], flops_per_round=1e9)
    assert main(["compare", str(fast), str(slow)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("final: global accuracy at the last evaluated round; target: global "
                        "accuracy >= 0.8")  # digits' default target
    assert lines[1].split() == ["run", "task", "method", "mu", "peers", "rounds", "final",
                                "GFLOPs/peer", "to", "target", "KiB", "sent/peer", "wall", "s"]
    # msfusion reaches 0.8 at round 2 (2 x 2 GFLOPs); fedrolex never does.
    assert lines[2].split() == ["msfusion", "digits", "msfusion", "0.25", "4", "3", "0.9000",
                                "4.000", "12.0", "4.5"]
    assert lines[3].split() == ["fedrolex", "digits", "fedrolex", "0.25", "4", "3", "0.7000",
                                "not", "reached", "12.0", "4.5"]
    assert lines[4] == f"wrote {fast / 'compare.png'}"
    assert (fast / "compare.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["compare", str(fast), str(slow), "--target", "0.65",
                 "--out", str(tmp_path / "both.png")]) == 0
    table = capsys.readouterr().out
    assert "fedrolex  digits  fedrolex  0.25      4       3  0.7000                  3.000" in table
    assert (tmp_path / "both.png").stat().st_size > 10_000


@pytest.mark.parametrize(("runs", "flags", "message"), [
    (["a"], [], "at least two run directories"),
    (["a", "text"], [], "different metrics (digits, kjv)"),
    (["a", "b"], ["--target", "1.5"], "target=1.5 is invalid"),
    (["a", "missing"], [], "missing/metrics.jsonl: no such file"),
])
def test_bad_input_is_named(runs: list[str], flags: list[str], message: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "a", "msfusion", [0.5])
    write_run(tmp_path / "b", "msfusion", [0.6])
    write_run(tmp_path / "text", "msfusion", [0.1], task="kjv")
    assert main(["compare", *(str(tmp_path / run) for run in runs), *flags]) == 2
    assert message in capsys.readouterr().err


def test_kjv_large_runs_are_scored_by_perplexity(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # The memory proof's runs (BENCHMARKS.md, issue 21) are compared by global_ppl, not accuracy.
    cluster = write_run(tmp_path / "cluster", "msfusion", [0.1, 0.2], task="kjv-large",
                        perplexity=[30.0, 7.5])
    alone = write_run(tmp_path / "alone", "msfusion", [0.1, 0.2], task="kjv-large",
                      perplexity=[30.0, 9.0])
    assert main(["compare", str(cluster), str(alone)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("final: global perplexity at the last evaluated round; target: global "
                        "perplexity <= 8.0")
    assert lines[2].split()[:7] == ["cluster", "kjv-large", "msfusion", "0.25", "4", "2", "7.5000"]
    assert lines[2].split()[7] == "4.000"  # 8.0 reached at round 2: 2 x 2 GFLOPs
    assert lines[3].split()[6:9] == ["9.0000", "not", "reached"]
