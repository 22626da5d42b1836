"""The command line: the sim contract runs, bad flags fail with an error that names them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import digits_user_accuracy, last_global_acc

from peerd.cli import main


def test_sim_command_writes_metrics_and_a_summary(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "sim", "--peers", "3", "--topology", "full",
         "--method", "fedrolex", "--mu", "0.25", "--task", "digits", "--rounds", "2",
         "--seed", "4", "--partition", "dirichlet:0.5", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "round 2/2" in result.stderr
    assert result.stdout.startswith("done: 2 rounds, global_acc ")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["fedrolex", "fedrolex"]
    assert records[-1]["mu"] == 0.25 and records[-1]["topology"] == "full"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mu", "1.5"], "mu=1.5 is invalid"),
        (["--mu", "half"], "give a number or a comma list"),
        (["--partition", "skewed"], "skewed"),
        (["--method", "gossip"], "invalid choice: 'gossip'"),
    ],
)
def test_bad_flags_are_rejected_by_name(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sim", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--topology", "/no/such/topology.toml"], "neither a bundled one"),
        (["--peers", "0"], "peers=0 is invalid"),
        (["--task", "fmnist", "--data-dir", "{empty}"], "apt-get install dataset-fashion-mnist"),
        (["--task", "kjv", "--partition", "dirichlet:0.5"], "dirichlet"),
    ],
)
def test_bad_values_exit_2_with_a_named_error(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [flag.replace("{empty}", str(tmp_path)) for flag in flags]
    assert main(["sim", "--rounds", "1", "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_cluster_command_runs_daemons_and_writes_sim_metrics(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "cluster", "--peers", "2", "--rounds", "2",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"peer-01: /\S+/peerd status --addr 127\.0\.0\.1:", result.stderr)
    # Each daemon's page and the cluster's own (docs/WEB.md).
    assert len(re.findall(r"peer-0\d: .* page http://127\.0\.0\.1:\d+/ ", result.stderr)) == 2
    assert re.search(r"^cluster page: http://127\.0\.0\.1:\d+/$", result.stderr, re.MULTILINE)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(0.0 <= r["global_acc"] <= 1.0 and r["peers"] == 2 for r in records)
    assert records[-1]["bytes_sent_cum_peer_mean"] > 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # The assembled model the watcher scored last, exported, scores the same in the user's hands.
    exported = tmp_path / "exported" / "model.safetensors"
    assert main(["export", "--from", str(tmp_path), "--out", str(exported)]) == 0
    assert digits_user_accuracy(exported) == last_global_acc(tmp_path)[1]
