"""`peerd bench exchange`: a small real run of peer processes, the model sizing, the mean check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peerd.algorithm.plan import Member
from peerd.algorithm.submodel import init_params
from peerd.bench.exchange import MIB, _check_mean, _engine, model_config, peer_ids
from peerd.bench.processes import BenchError
from peerd.models.transformer import TransformerSpec


def test_small_run_reports_the_step_and_the_tcp_floor() -> None:
    # Through the CLI, as BENCHMARKS.md documents it; the run itself checks the merged mean.
    result = subprocess.run(
        [sys.executable, "-c", "from peerd.cli import main; main()", "bench", "exchange",
         "--peers", "3", "--mib", "2", "--repeat", "2", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    model_bytes = sum(t.numel() * 4 for t in init_params(TransformerSpec(model_config(2)),
                                                          0).values())
    assert report["peers"] == 3 and report["repeats"] == 2
    assert report["bulk"] is True  # 2 MiB slices: over the bulk path, as a daemon sends them
    assert report["model_bytes"] == model_bytes
    assert report["bytes_per_step"] == 6 * model_bytes  # every peer to both others
    assert report["median_round_s"] > 0 and report["tcp_floor_s"] > 0
    # The direct exchange: each peer takes in both others' whole models at the socket.
    assert 2 * model_bytes <= min(report["socket_bytes_in"])
    assert max(report["socket_bytes_in"]) <= 1.05 * 2 * model_bytes


@pytest.mark.slow  # 4 processes and their relays, about a minute; tests/test_reduce.py counts
# the same bytes in memory in CI
def test_reduce_scatter_moves_two_n_minus_one_over_n_of_the_model_at_the_socket() -> None:
    # 4 peers at mu 1: each takes in 3/4 of the model as values and 3/4 as means (the run
    # checks that every peer ends with the mean of all four, as the direct exchange does).
    result = subprocess.run(
        [sys.executable, "-c", "from peerd.cli import main; main()", "bench", "exchange",
         "--peers", "4", "--mib", "1", "--repeat", "1", "--reduce-scatter", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    floor = 2 * 3 / 4 * report["model_bytes"]
    assert report["reduce_scatter"] is True
    assert all(floor <= received <= 1.05 * floor for received in report["socket_bytes_in"])
    assert report["socket_bytes_over_floor"] <= 1.05


@pytest.mark.parametrize("mib", [2, 16, 64])
def test_model_is_about_the_size_asked_for(mib: int) -> None:
    params = init_params(TransformerSpec(model_config(mib)), 0)
    size = sum(t.numel() * 4 for t in params.values()) / MIB
    assert 0.6 * mib <= size <= 1.4 * mib


def test_mean_check_catches_a_peer_that_did_not_merge() -> None:
    spec = TransformerSpec(model_config(1))
    ids = peer_ids(2)
    engines = [_engine(peer_id, spec, seed) for seed, peer_id in enumerate(ids)]
    members = [Member(peer_id, 1.0) for peer_id in ids]
    contexts = [engine.begin_round(0, members) for engine in engines]
    messages = [engine.outbox(ctx)[0] for engine, ctx in zip(engines, contexts, strict=True)]
    with pytest.raises(BenchError, match="off the mean"):
        _check_mean(engines[0], spec, 2)  # before merging: its own values only
    engines[0].merge(contexts[0], [messages[1]])
    _check_mean(engines[0], spec, 2)
    assert all(torch.isfinite(t).all() for t in engines[0].params.values())


def test_anchor_options_need_against_hivemind() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "bench", "exchange", "--also-mib", "16"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "need --against-hivemind" in result.stderr


@pytest.mark.slow
def test_against_hivemind_prints_both_in_one_run(tmp_path: Path) -> None:
    # Installs hivemind 1.1.12 from PyPI into a fresh virtual environment (about a minute).
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "bench", "exchange", "--against-hivemind",
         "--peers", "3", "--mib", "1", "--repeat", "1", "--reduce-scatter", "--json",
         "--hivemind-venv", str(tmp_path / "hivemind")],
        capture_output=True, text=True, timeout=1800, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(result.stdout)
    assert row["peers"] == 3 and row["reduce_scatter"] is True
    assert row["peerd_step_s"] > 0 and row["hivemind_step_s"] > 0
    assert row["socket_bytes_over_floor"] <= 1.05
