"""examples/: a user's MLP, ResNet with BatchNorm and GPT, each sliced automatically, train in
`peerd sim` (and, marked slow, `peerd cluster`) to full coverage with sub-models of at most
0.35 of the full model's forward FLOPs at mu 0.5; the ResNet's export (BatchNorm statistics
included) loads strictly into the user's class and scores the reported global_acc."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file
from support import task_user_accuracy
from test_data_dir import image_folder

import peerd
from peerd.algorithm.plan import Member, MSFusionPlanner
from peerd.algorithm.submodel import forward_flops_per_sample
from peerd.cli import main
from peerd.models.autoslice import AutoSpec
from peerd.models.base import full_units, plan_units

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ("mlp_tabular", "resnet_images", "gpt_text")
# Rounds and drift period after which every entry has been in some peer's window (3 peers).
ROUNDS, DRIFT_PERIOD = ["--rounds", "6"], ["--drift-period", "4"]


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}_under_test",
                                                  EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", NAMES)
def test_an_example_trains_to_full_coverage_on_small_sub_models(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / name
    assert main(["sim", "--task", f"{EXAMPLES / name}.py:small_task", "--peers", "3",
                 *ROUNDS, *DRIFT_PERIOD, "--eval-every", "3", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    records = _records(out)
    last = records[-1]
    assert last["coverage"] == 1.0
    assert last["flops_per_sample_peer_mean"] <= 0.35 * last["flops_per_sample_full"]
    assert last["train_loss_mean"] < records[0]["train_loss_mean"]


# The examples' full-size models and one input item each (no data needed to slice them).
FULL_SIZE = {
    "mlp_tabular": (lambda m: m.MLP(64, 512, 10), torch.zeros(64), "image", None),
    "resnet_images": (lambda m: m.ResNet((32, 64, 128), 10), torch.zeros(1, 28, 28), "image",
                      None),
    "gpt_text": (lambda m: m.GPT(80, 128, 8, 4), torch.zeros(64, dtype=torch.long), "text",
                 lambda m: peerd.Slicing(spans={"blocks.*.attn.q": m.HEAD_DIM})),
}


@pytest.mark.parametrize("name", NAMES)
def test_full_size_sub_models_at_mu_half_cost_at_most_035_of_the_full_forward(name: str) -> None:
    """Counted on the real sub-modules peerd builds (FlopCounterMode over their forward)."""
    module = _example(name)
    factory, example, kind, declaration = FULL_SIZE[name]
    spec = AutoSpec(lambda: factory(module), example, kind,
                    declaration and declaration(module))
    plan = MSFusionPlanner(seed=0).plan(0, [Member(str(n), 0.5) for n in range(3)],
                                        spec.groups)["0"]
    ratio = (forward_flops_per_sample(spec, plan_units(plan))
             / forward_flops_per_sample(spec, full_units(spec)))
    assert ratio <= 0.35, ratio


def test_the_resnet_export_carries_batchnorm_statistics_and_scores_global_acc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out, exported = tmp_path / "resnet", tmp_path / "resnet.safetensors"
    assert main(["sim", "--task", f"{EXAMPLES / 'resnet_images'}.py:small_task",
                 "--peers", "2", "--rounds", "2", "--out", str(out), "--quiet"]) == 0
    assert main(["export", "--from", str(out), "--out", str(exported)]) == 0
    capsys.readouterr()
    state = load_file(str(exported))
    assert state["stem.1.running_var"].shape == (8,)
    assert not torch.equal(state["stem.1.running_var"], torch.ones(8))  # trained, averaged
    task = _example("resnet_images").small_task()
    assert task_user_accuracy(task, exported) == _records(out)[-1]["global_acc"]


def test_the_resnet_trains_on_an_image_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """IMAGE_FOLDER: colour PNGs in one folder per class, as a user's photos would be."""
    monkeypatch.setenv("IMAGE_FOLDER", str(image_folder(tmp_path / "images", "RGB", 12)))
    out = tmp_path / "run"
    assert main(["sim", "--task", f"{EXAMPLES / 'resnet_images'}.py:small_task", "--peers", "2",
                 "--rounds", "1", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    task = _example("resnet_images").small_task()
    assert task.train.tensors[0].shape[1:] == (3, 12, 12)
    assert len(task.train) + len(task.test) == 200
    assert _records(out)[-1]["global_acc"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_an_example_trains_in_a_cluster_of_daemons(name: str, tmp_path: Path) -> None:
    """Real daemon processes load the example themselves (about a minute each)."""
    out = tmp_path / name
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "cluster", "--task",
         f"{EXAMPLES / name}.py:small_task", "--peers", "3", *ROUNDS, *DRIFT_PERIOD,
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr
    last = _records(out)[-1]
    assert last["coverage"] == 1.0
    assert last["flops_per_sample_peer_mean"] <= 0.35 * last["flops_per_sample_full"]


def test_dropout_draws_the_same_masks_whatever_the_process_drew_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The MLP example has dropout: its training is seeded by (seed, round, peer), as a
    daemon's and the simulator's must be."""
    losses = []
    for run in range(2):
        torch.rand(1000 * (run + 1))  # whatever else the process did before
        out = tmp_path / f"run{run}"
        assert main(["sim", "--task", f"{EXAMPLES / 'mlp_tabular'}.py:small_task", "--peers",
                     "2", "--rounds", "2", "--eval-every", "2", "--out", str(out),
                     "--quiet"]) == 0
        losses.append([record["train_loss_mean"] for record in _records(out)])
    capsys.readouterr()
    assert losses[0] == losses[1]
