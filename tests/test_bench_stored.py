"""Stored benchmark runs (peerd/bench/stored.py): read back only when the stored config is the
same and every round is there; the spread over seeds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from peerd.bench.stored import CONFIG_FILE, METRICS_FILE, config_json, run_or_reuse, spread
from peerd.config import SimConfig, TrainConfig

MARK = -1.0  # a train loss no run writes: its presence shows a record was read back


def tiny(out: Path, seed: int = 0) -> SimConfig:
    return SimConfig(peers=2, rounds=2, seed=seed, out=str(out), eval_samples=32,
                     train=TrainConfig(max_local_steps=1))


def mark_stored_run(out: Path) -> None:
    """Edits the stored records, so that reading them back differs from training again."""
    metrics = out / METRICS_FILE
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({**r, "train_loss_mean": MARK}) + "\n"
                               for r in records))


def test_a_complete_run_of_the_same_config_is_read_back(tmp_path: Path) -> None:
    config = tiny(tmp_path)
    logged: list[str] = []
    first = run_or_reuse(config, reuse=True, log=logged.append)
    assert logged == [f"run {tmp_path.name}"] and len(first) == 2
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == config_json(config)
    mark_stored_run(tmp_path)
    again = run_or_reuse(config, reuse=True, log=logged.append)
    assert len(logged) == 1  # nothing trained
    assert [r["train_loss_mean"] for r in again] == [MARK, MARK]
    # Without --reuse the run trains again.
    assert run_or_reuse(config, reuse=False)[0]["train_loss_mean"] == first[0]["train_loss_mean"]


def test_a_stored_run_of_another_config_or_cut_short_trains_again(tmp_path: Path) -> None:
    config = tiny(tmp_path)
    run_or_reuse(config, reuse=True)
    mark_stored_run(tmp_path)
    other = replace(config, seed=1)
    records = run_or_reuse(other, reuse=True)
    assert MARK not in [r["train_loss_mean"] for r in records]
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["seed"] == 1
    # The same config, its metrics cut to one round of two: trained again.
    mark_stored_run(tmp_path)
    metrics = tmp_path / METRICS_FILE
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    assert MARK not in [r["train_loss_mean"] for r in run_or_reuse(other, reuse=True)]
    assert len(metrics.read_text().splitlines()) == 2
    # A stored config that does not parse describes no run.
    mark_stored_run(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    assert MARK not in [r["train_loss_mean"] for r in run_or_reuse(other, reuse=True)]


def test_the_spread_is_median_min_max_rounded() -> None:
    assert spread([0.5, 0.123456, 0.9]) == {"median": 0.5, "min": 0.1235, "max": 0.9}
    assert spread([3.0, 1.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
