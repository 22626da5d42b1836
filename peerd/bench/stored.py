"""What the benchmarks built on `peerd sim` share: runs kept on disk with the config that
produced them, read back instead of trained again only when that config matches and every
round is there; and a figure over seeds as its median and range."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from peerd.config import SimConfig
from peerd.sim import run as run_sim

METRICS_FILE = "metrics.jsonl"  # written by peerd sim
CONFIG_FILE = "config.json"  # written here once the run has finished


def config_json(config: SimConfig) -> dict:
    """The config as stored beside its run (JSON types: tuples read back as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def stored_records(config: SimConfig) -> list[dict] | None:
    """The per-round records of a finished run of exactly this config under config.out; None
    when there is none (no run, another config, or a run cut short)."""
    out = Path(config.out)
    metrics, saved = out / METRICS_FILE, out / CONFIG_FILE
    if not (metrics.exists() and saved.exists()):
        return None
    try:
        same = json.loads(saved.read_text()) == config_json(config)
    except json.JSONDecodeError:
        return None  # a damaged record of the config describes nothing: train again
    if not same:
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return records if len(records) == config.rounds else None


def run_or_reuse(config: SimConfig, reuse: bool,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """The run's per-round records: read back when `reuse` finds it stored (stored_records),
    else trained now (announced through `log` by the run's directory name) and stored."""
    if reuse and (records := stored_records(config)) is not None:
        return records
    saved = Path(config.out) / CONFIG_FILE
    saved.unlink(missing_ok=True)  # a run cut short must not be reused
    if log is not None:
        log(f"run {Path(config.out).name}")
    records = run_sim(config, plot=False)  # the benchmarks plot their own figures
    saved.write_text(json.dumps(config_json(config)))
    return records


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max over seeds, rounded to 4 decimals (finer is noise in a report)."""
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}
