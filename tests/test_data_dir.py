"""`--data-dir` with a user's own files: an image folder (one subfolder per class), a CSV table
(the `tabular` task, MLP sliced automatically) and a folder of text files; a malformed file is
named with the entry at fault, without a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peerd.cli import main
from peerd.data import load_task_data
from peerd.data.datasets import _digits_table


def image_folder(root: Path, mode: str = "L", size: int = 8) -> Path:
    """The digits written as PNG files under one folder per class (the first 200)."""
    features, labels = _digits_table()
    for index, (pixels, label) in enumerate(zip(features[:200], labels[:200], strict=True)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        grey = (pixels.reshape(8, 8) * 255 / 16).astype(np.uint8)
        Image.fromarray(grey, "L").convert(mode).resize((size, size)).save(
            folder / f"{index}.png")
    return root


def _csv(path: Path, rows: int = 300, label: str = "digit") -> Path:
    features, labels = _digits_table()
    header = ",".join([f"p{i}" for i in range(64)] + [label])
    lines = [header] + [",".join([*(f"{v:g}" for v in row), str(label)])
                        for row, label in zip(features[:rows], labels[:rows], strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_image_folder_loads_grey_and_rgb(tmp_path: Path) -> None:
    grey = load_task_data("digits", image_folder(tmp_path / "grey"))
    assert grey.train.inputs.shape[1:] == (1, 8, 8)
    assert len(grey.train) + len(grey.test) == 200 and grey.num_classes == 10
    rgb = load_task_data("fmnist", image_folder(tmp_path / "rgb", "RGB", 12))
    assert rgb.train.inputs.shape[1:] == (3, 12, 12) and rgb.image_size == 12


def test_a_csv_table_trains_the_tabular_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    table, out = _csv(tmp_path / "digits.csv"), tmp_path / "run"
    assert main(["sim", "--task", "tabular", "--data-dir", str(table), "--label-column",
                 "digit", "--peers", "2", "--rounds", "2", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["global_acc"] > 0.3  # 10 classes: chance is 0.1
    assert last["flops_per_sample_peer_mean"] <= 0.35 * last["flops_per_sample_full"]


def test_an_image_folder_trains_the_cnn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, out = image_folder(tmp_path / "images"), tmp_path / "run"
    assert main(["sim", "--task", "digits", "--data-dir", str(folder), "--peers", "2",
                 "--rounds", "1", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert (out / "model.safetensors").is_file()


def _broken_image(root: Path) -> str:
    folder = image_folder(root / "images")
    (folder / "class3" / "bad.png").write_bytes(b"not a png")
    return str(folder)


def _odd_size(root: Path) -> str:
    folder = image_folder(root / "images")
    Image.new("L", (9, 9)).save(folder / "class4" / "odd.png")
    return str(folder)


def _bad_cell(root: Path) -> str:
    path = _csv(root / "t.csv", rows=20, label="label")
    lines = path.read_text().splitlines()
    lines[5] = lines[5].replace("0,", "zero,", 1)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _bad_text(root: Path) -> str:
    folder = root / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("In the beginning " * 40)
    (folder / "b.txt").write_bytes(b"caf\xe9 " * 40)
    return str(folder)


@pytest.mark.parametrize(("task", "make", "message"), [
    ("digits", _broken_image, "class3/bad.png: not a readable PNG or JPEG image"),
    ("digits", _odd_size, "class4/odd.png: 9x9 pixels, but"),
    ("tabular", _bad_cell, "t.csv: line 6, column 'p"),
    ("tabular", lambda root: str(_csv(root / "t.csv", rows=20)), "no column 'label'"),
    ("kjv", _bad_text, "b.txt: not UTF-8 text at byte 3"),
])
def test_a_malformed_file_is_named(
    task: str, make: Callable[[Path], str], message: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = make(tmp_path)
    code = main(["sim", "--task", task, "--data-dir", data_dir, "--rounds", "1",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
