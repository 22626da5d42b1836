"""`peerd export`: the trained global model loads strictly into the model's own class and
scores exactly the last reported global_acc; what is missing is named."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import digits_user_accuracy, last_global_acc

from peerd.cli import main
from peerd.config import SimConfig
from peerd.global_model import MODEL_FILE
from peerd.sim import run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    # Evaluated at rounds 2 and 3: the file must hold round 3's model, not round 2's.
    run(SimConfig(peers=3, rounds=3, eval_every=2, mu=(0.5,), out=str(out), seed=2), plot=False)
    return out


def test_export_scores_exactly_the_last_global_acc(
    digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    destination = tmp_path / "nested" / "digits.safetensors"
    assert main(["export", "--from", str(digits_run), "--out", str(destination)]) == 0
    round_number, reported = last_global_acc(digits_run)
    assert round_number == 3
    assert f"after round 3, global_acc {reported:.4f}" in capsys.readouterr().out
    assert digits_user_accuracy(destination) == reported
    assert 0.5 < reported < 1.0  # a trained model, and one that a wrong load would change


def _copy_run(run_dir: Path, to: Path, files: tuple[str, ...]) -> Path:
    to.mkdir()
    for name in files:
        (to / name).write_bytes((run_dir / name).read_bytes())
    return to


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no_dir", "no such directory"),
        ("no_metrics", "has no metrics.jsonl"),
        ("no_evaluation", "has no evaluated round yet"),
        ("no_model", f"has no {MODEL_FILE}"),
        ("older_metrics", "holds the model of round 3, but the last evaluated round"),
        ("damaged_model", "is not a readable safetensors file"),
    ],
)
def test_what_is_missing_is_named(
    setup: str, message: str, digits_run: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    if setup == "no_metrics":
        _copy_run(digits_run, run_dir, (MODEL_FILE,))
    elif setup == "no_model":
        _copy_run(digits_run, run_dir, ("metrics.jsonl",))
    elif setup in ("no_evaluation", "older_metrics", "damaged_model"):
        _copy_run(digits_run, run_dir, ("metrics.jsonl", MODEL_FILE))
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        kept = {"no_evaluation": lines[:1], "older_metrics": lines[:2]}.get(setup, lines)
        (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")
        if setup == "damaged_model":
            (run_dir / MODEL_FILE).write_bytes((run_dir / MODEL_FILE).read_bytes()[:100])
    destination = tmp_path / "model.safetensors"
    assert main(["export", "--from", str(run_dir), "--out", str(destination)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peerd export: error: ") and message in err, err
    assert "Traceback" not in err
    assert not destination.exists()


def test_flags_of_a_live_export_are_refused_with_from(
    digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    destination = tmp_path / "model.safetensors"
    assert main(["export", "--from", str(digits_run), "--out", str(destination),
                 "--tls-dir", "tls", "--task", "digits"]) == 2
    assert capsys.readouterr().err == ("peerd export: error: --task, --tls-dir: only with "
                                       "--addr (--from reads the model the run wrote)\n")
    assert not destination.exists()
