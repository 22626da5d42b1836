"""`peerd bench stragglers`: a tiny run of both modes, the result's shape and what must hold."""

from __future__ import annotations

import argparse

import pytest

from peerd.bench.processes import BenchError
from peerd.bench.stragglers import _number_in, run_stragglers

ROUNDS = 2


def test_tiny_run_of_both_modes() -> None:
    # Target 0: reached by the first evaluated round, whatever the accuracy; times count from
    # there, so there is nothing to compare.
    result = run_stragglers(peers=3, rounds=ROUNDS, slowdown=2, target=0.0, task="digits")
    assert (result.strict.mode, result.semi_async.mode) == ("strict", "semi-async")
    for run in (result.strict, result.semi_async):
        assert run.rounds == ROUNDS
        assert run.round_to_target == 1 and run.seconds_to_target == 0
        assert 0 < run.startup_s < run.wall_s
        assert 0 <= run.final_acc <= 1
        assert [number for number, _, _ in run.curve] == list(range(1, ROUNDS + 1))
        assert run.curve[0][1] == 0 and run.curve[-1][2] == run.final_acc
    assert result.time_ratio is None
    assert result.accuracy_drop == pytest.approx(
        result.strict.final_acc - result.semi_async.final_acc)
    report = result.to_json()
    assert set(report) == {"peers", "slowdown", "target", "strict", "semi_async", "time_ratio",
                           "accuracy_drop"}
    assert report["strict"]["mode"] == "strict" and report["peers"] == 3
    assert "time ratio semi-async / strict: n/a" in result.describe()


def test_arguments_are_checked() -> None:
    with pytest.raises(BenchError, match="at least 3 peers"):
        run_stragglers(peers=2, rounds=2, slowdown=4, target=0.9, task="digits")
    assert _number_in("slowdown", 1)("4") == 4.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"slowdown 0\.5 must be in"):
        _number_in("slowdown", 1)("0.5")
    with pytest.raises(argparse.ArgumentTypeError, match="target 'x' is not a number"):
        _number_in("target", 0, 1)("x")
