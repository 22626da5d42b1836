"""`peerd.Task` and `--task FILE.py:FUNCTION`: a user's task trains in `peerd sim`, its export
loads strictly into the user's own model, and a bad task gets a one-line error naming it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from support import last_global_acc, task_user_accuracy

import peerd
from peerd.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_digits_task.py"


def _example_task() -> peerd.Task:
    spec = importlib.util.spec_from_file_location("own_digits_task_under_test", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.task()


def test_a_users_task_trains_and_exports_what_it_scored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out, exported = tmp_path / "run", tmp_path / "own.safetensors"
    assert main(["sim", "--task", f"{EXAMPLE}:task", "--peers", "3", "--rounds", "2",
                 "--out", str(out), "--quiet"]) == 0
    assert main(["export", "--from", str(out), "--out", str(exported)]) == 0
    capsys.readouterr()
    round_number, reported = last_global_acc(out)
    assert round_number == 2
    assert task_user_accuracy(_example_task(), exported) == reported


@pytest.mark.slow
def test_a_users_task_trains_in_a_cluster_of_daemons(tmp_path: Path) -> None:
    """Real daemon processes load the task from the file themselves (about a minute)."""
    out, exported = tmp_path / "cluster", tmp_path / "own.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "cluster", "--task", f"{EXAMPLE}:task",
         "--peers", "2", "--rounds", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert main(["export", "--from", str(out), "--out", str(exported)]) == 0
    assert task_user_accuracy(_example_task(), exported) == last_global_acc(out)[1]


BODY = """
import torch
from torch.utils.data import TensorDataset
import peerd
from peerd.models import CNNConfig, CNNSpec
from peerd.models.base import full_units

SPEC = CNNSpec(CNNConfig(image_size=8, num_classes=2, stage_widths=(4, 8)))
OTHER = CNNSpec(CNNConfig(image_size=8, num_classes=2, stage_widths=(4, 16)))
DATA = TensorDataset(torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))


def full(spec):
    return spec.build(full_units(spec))


def not_finite():
    model = full(SPEC)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    return model


def make(**fields):
    return peerd.Task(**{"name": "t", "model": lambda: full(SPEC), "train": DATA, "test": DATA,
                         "slicing": SPEC, **fields})


def not_a_task():
    return {"name": "t"}


class WithAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(64, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        hidden = self.embed(x.flatten(1)).unsqueeze(1)
        return self.head(self.attn(hidden, hidden, hidden)[0].squeeze(1))


def not_a_module():
    return make(model=lambda: "a model", slicing=None)


def wrong_input():
    return make(model=lambda: torch.nn.Linear(3, 2), slicing=None)


def unsliceable():
    return make(model=WithAttention, slicing=None)


def mismatched():
    return make(model=lambda: full(OTHER))


def nan_model():
    return make(model=not_finite)


def batch_norm():
    model = full(SPEC)
    model.stem.append(torch.nn.BatchNorm2d(4, affine=False))
    return make(model=lambda: model)


def vector_loss():
    return make(loss=lambda model, batch: model(batch[0]).sum(dim=1))


def failing_loss():
    return make(loss=lambda model, batch: model(batch[1]))


def constant_loss():
    return make(loss=lambda model, batch: torch.tensor(1.0))


CALLS = []


def counted_loss(model, batch):
    CALLS.append(len(batch[1]))
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], label_smoothing=0.1)


def own_loss():
    return make(loss=counted_loss)
"""


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("{dir}/missing.py:task", "no such file"),
        ("{file}:absent", "has no function 'absent'"),
        ("{file}:not_a_task", "not_a_task() returned dict, not a peerd.Task"),
        ("no_such_package.tasks:task", "no module named 'no_such_package'"),
        ("{file}:not_a_module", "model() returned str, not a torch.nn.Module"),
        ("{file}:wrong_input", "the model's forward fails on one training input of shape "
                               "(1, 1, 8, 8): RuntimeError"),
        ("{file}:unsliceable", "module attn cannot be sliced: nn.MultiheadAttention packs"),
        ("{file}:mismatched", "model() and slicing disagree on parameters"),
        ("{file}:nan_model", "is not finite"),
        ("{file}:vector_loss", "loss(model, batch) on 8 training items returned (8,), not a "
                               "scalar tensor"),
        ("{file}:failing_loss", "loss(model, batch) on 8 training items failed: RuntimeError"),
        ("{file}:constant_loss", "has no gradient"),
        ("{file}:batch_norm", "keeps running statistics that the declared table does not list"),
        ("mnist", "invalid choice: 'mnist'"),
    ],
)
def test_a_bad_task_is_named_without_a_traceback(
    reference: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    task_file = tmp_path / f"user_tasks_{len(reference)}.py"
    task_file.write_text(BODY)
    reference = reference.replace("{file}", str(task_file)).replace("{dir}", str(tmp_path))
    try:
        code = main(["sim", "--task", reference, "--rounds", "1", "--out",
                     str(tmp_path / "out"), "--quiet"])
    except SystemExit as exit_info:  # argparse refuses a name that is no task
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_tasks_own_loss_is_what_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    task_file = tmp_path / "own_loss_task.py"
    task_file.write_text(BODY)
    assert main(["sim", "--task", f"{task_file}:own_loss", "--peers", "2", "--rounds", "1",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()
    calls = sys.modules["peerd_user_task_own_loss_task"].CALLS
    # One check on a batch of the 8 items, then every local step of both peers.
    assert calls[0] == 8 and len(calls) > 2


def test_the_contrastive_term_needs_a_models_representation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    mlp = EXAMPLE.parent / "mlp_tabular.py"
    assert main(["sim", "--task", f"{mlp}:small_task", "--contrastive", "--rounds", "1",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--contrastive needs a model with features() and logits()" in err
    assert "Traceback" not in err
