"""Daemons take msfusion's planner settings (overlap, regroup period) from their options, and
peers that disagree on how plans are computed refuse each other with the reason."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

import torch
from daemons import ClusterCa, kill_all, start_loopback_daemons
from safetensors.torch import load_file

from peerd.agreement import agreed_settings, cluster_fingerprint, fingerprint_mismatch
from peerd.algorithm.plan import PLANNERS
from peerd.config import DaemonConfig, SimConfig, planner_options
from peerd.sim import build, run_round

MODEL = "0123456789abcdef"


def planner_settings(method: str, seed: int, overlap: str, drift_period: int
                     ) -> dict[str, object]:
    return agreed_settings(DaemonConfig(method=method, seed=seed, overlap=overlap,
                                        drift_period=drift_period))


def test_settings_that_do_not_change_the_plans_do_not_change_the_fingerprint() -> None:
    def printed(method: str, drift_period: int) -> str:
        return cluster_fingerprint(MODEL, planner_settings(method, 0, "static", drift_period))

    assert printed("fedrolex", 1) == printed("fedrolex", 10)
    assert printed("msfusion", 1) != printed("msfusion", 10)
    assert printed("msfusion", 1) != printed("fedrolex", 1)
    assert cluster_fingerprint(MODEL, planner_settings("msfusion", 0, "static", 1)) != \
        cluster_fingerprint(MODEL, planner_settings("msfusion", 1, "static", 1))
    assert printed("msfusion", 1).startswith(MODEL + ".")


def test_a_mismatch_names_the_half_that_differs() -> None:
    ours = cluster_fingerprint(MODEL, planner_settings("msfusion", 0, "static", 1))
    theirs = cluster_fingerprint(MODEL, planner_settings("msfusion", 0, "decay:5", 1))
    reason = fingerprint_mismatch(theirs, ours)
    assert reason.startswith(f"planner fingerprint {theirs.split('.')[1]}, expected ")
    names = ("method, seed, reduce_scatter, overlap, drift_period, drift_rates, layout and "
             "whole_groups")
    assert f"{names} must be the same" in reason
    other_model = cluster_fingerprint("f" * 16, planner_settings("msfusion", 0, "static", 1))
    assert fingerprint_mismatch(other_model, ours) == (
        f"model fingerprint {'f' * 16}, expected {MODEL}: the model differs (another task or "
        f"model)")


def test_daemons_with_different_regroup_periods_refuse_each_other(
    tmp_path: Path, cluster_ca: ClusterCa
) -> None:
    daemons = start_loopback_daemons(tmp_path, 2, ["--rounds", "1", "--sync"], cluster_ca,
                                     extra_by_position={1: ["--drift-period", "7"]})
    try:
        deadline = time.monotonic() + 120
        while not all("planner fingerprint" in d.output() for d in daemons):
            assert time.monotonic() < deadline, [d.output() for d in daemons]
            assert all(d.process.poll() is None for d in daemons), [d.output() for d in daemons]
            time.sleep(0.5)
        for daemon in daemons:
            assert "layout and whole_groups must be the same on every member" in daemon.output()
            assert not (daemon.state_dir / "rounds.jsonl").exists()
    finally:
        kill_all(daemons)


def test_cluster_runs_the_planner_settings_it_is_given(tmp_path: Path) -> None:
    rounds, settings = 3, {"drift_period": 2, "overlap": "decay:2"}
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "cluster", "--peers", "3", "--rounds", str(rounds),
         "--sync", "--no-mdns", "--quiet", "--drift-period", "2", "--overlap", "decay:2",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    torch.set_num_threads(1)  # the daemons train with one thread each
    given = build(SimConfig(peers=3, rounds=rounds, out="unused", **settings))
    default = build(SimConfig(peers=3, rounds=rounds, out="unused"))
    for round_index in range(rounds):
        run_round(given, round_index)
        run_round(default, round_index)
    for position, engine in enumerate(given.engines):
        saved = load_file(tmp_path / f"peer-{position:02d}" / "params.safetensors")
        assert max(float((saved[n] - t).abs().max()) for n, t in engine.params.items()) <= 1e-6
        other = default.engines[position].params
        assert max(float((saved[n] - t).abs().max()) for n, t in other.items()) > 1e-3


def test_each_planner_takes_exactly_the_options_declared_for_it() -> None:
    """A planner's settings are the options peerd/config.py declares with its method's name:
    its class takes them as keywords (and msfusion the model, `spec`, whose axes table colours
    its groups), and the fingerprint covers them under that method only."""
    for method, planner_class in PLANNERS.items():
        keywords = (set(inspect.signature(planner_class.__init__).parameters)
                    - {"self", "seed", "spec"})
        config = DaemonConfig(method=method)
        assert keywords == set(planner_options(config)), method
        agreed = {"method", "seed", "reduce_scatter", *keywords}
        assert set(agreed_settings(config)) == agreed, method
    assert set(planner_options(DaemonConfig())) == {"overlap", "drift_period", "drift_rates",
                                                    "layout", "whole_groups"}
