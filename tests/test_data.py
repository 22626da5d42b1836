"""Tests of peerd.data: IDX files, the three tasks' datasets and partitioning."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from peerd.data import (
    CharVocab,
    DatasetMissing,
    Split,
    TaskData,
    load_task_data,
    local_train_test,
    parse_partition,
    partition,
)
from peerd.data.datasets import FMNIST_DIR, IDX_FILES, _load_cached
from peerd.data.idx import read_idx, write_idx
from peerd.data.partition import PartitionSpec

# ---- IDX -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-5, 0, 70000], dtype=np.int32),
        np.linspace(-1, 1, 6).reshape(3, 2),
    ],
    ids=["uint8", "int32", "float64"],
)
def test_idx_round_trip(tmp_path: Path, suffix: str, array: np.ndarray) -> None:
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_idx_reads_handmade_header(tmp_path: Path) -> None:
    # Magic 0x00000803: ubyte, 3 dims; dims 2x1x3 big-endian.
    header = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3])
    (tmp_path / "x").write_bytes(header + bytes(range(6)))
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), np.arange(6).reshape(2, 1, 3))


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_truncated_file_names_expected_size(tmp_path: Path, suffix: str) -> None:
    raw = tmp_path / "full"
    write_idx(raw, np.zeros((4, 5), dtype=np.uint8))  # 4 + 2 * 4 + 20 = 32 bytes
    path = tmp_path / f"cut{suffix}"
    cut = raw.read_bytes()[:-3]
    path.write_bytes(gzip.compress(cut) if suffix else cut)
    with pytest.raises(ValueError, match=r"should be 32 bytes, but it is 29"):
        read_idx(path)


def test_idx_rejects_non_idx(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "x")


# ---- images ----------------------------------------------------------------------------------


def test_digits_shapes_split_and_standardisation() -> None:
    data = load_task_data("digits")
    assert (data.name, data.kind, data.num_classes, data.image_size) == ("digits", "image", 10, 8)
    assert data.block_size is None and data.group_names == ()
    assert len(data.train) + len(data.test) == 1797
    assert len(data.test) == pytest.approx(0.2 * 1797, abs=5)
    assert data.train.inputs.shape == (len(data.train), 1, 8, 8)
    assert data.train.inputs.dtype == torch.float32 and data.train.targets.dtype == torch.int64
    assert data.train.groups is None
    # Every class is in the test set at roughly its share.
    test_counts = np.bincount(data.test.targets.numpy(), minlength=10)
    assert test_counts.min() >= 30
    assert abs(data.train.inputs.mean().item()) < 1e-4
    assert data.train.inputs.std().item() == pytest.approx(1.0, abs=1e-3)


def test_digits_deterministic_and_cached() -> None:
    data = load_task_data("digits")
    assert load_task_data("digits", block_size=7) is data  # block_size is ignored for images
    fresh = _load_cached.__wrapped__("digits", None, None, "label")  # bypass the cache
    assert torch.equal(fresh.train.inputs, data.train.inputs)
    assert torch.equal(fresh.test.targets, data.test.targets)


def test_digits_from_idx_data_dir(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sizes = {"train": 30, "t10k": 10}
    for prefix, n in sizes.items():
        write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 17, (n, 8, 8), np.uint8)
        )
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, np.uint8))
    data = load_task_data("digits", data_dir=tmp_path)
    assert (len(data.train), len(data.test), data.image_size) == (30, 10, 8)
    assert data.train.inputs.shape == (30, 1, 8, 8)


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match=r"'mnist'.*digits, fmnist, kjv"):
        load_task_data("mnist")


@pytest.mark.skipif(
    not FMNIST_DIR.is_dir(), reason=f"{FMNIST_DIR} absent: apt-get install dataset-fashion-mnist"
)
def test_fmnist_official_split() -> None:
    data = load_task_data("fmnist")
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert data.train.inputs.shape == (60000, 1, 28, 28)
    assert data.test.inputs.shape == (10000, 1, 28, 28)
    assert (data.num_classes, data.image_size) == (10, 28)
    assert np.bincount(data.train.targets.numpy()).tolist() == [6000] * 10
    assert abs(data.train.inputs.mean().item()) < 1e-3


def test_fmnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissing) as err:
        load_task_data("fmnist", data_dir=tmp_path)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path) in message and IDX_FILES[0] in message and "--data-dir" in message


# ---- text ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kjv() -> TaskData:
    return load_task_data("kjv")


def test_kjv_groups_and_shapes(kjv: TaskData) -> None:
    assert (kjv.kind, kjv.block_size, kjv.image_size) == ("text", 64, None)
    assert len(kjv.group_names) == 66
    assert kjv.group_names[0] == "Genesis" and kjv.group_names[21] == "Song of Solomon"
    assert kjv.train.inputs.shape[1:] == (64,) and kjv.train.inputs.dtype == torch.int64
    # Every book appears in train and in test.
    assert np.unique(kjv.train.groups).tolist() == list(range(66))
    assert np.unique(kjv.test.groups).tolist() == list(range(66))
    assert 0.08 < len(kjv.test) / (len(kjv.train) + len(kjv.test)) < 0.12
    assert kjv.num_classes == kjv.vocab.size


def test_kjv_targets_are_shifted_inputs(kjv: TaskData) -> None:
    for split in (kjv.train, kjv.test):
        assert torch.equal(split.inputs[:, 1:], split.targets[:, :-1])
    first = kjv.vocab.decode(kjv.train.inputs[0])
    assert first.startswith("In the beginning God created the heaven and the earth.\n")


def test_char_vocab_round_trip(kjv: TaskData) -> None:
    text = "And God said, Let there be light: and there was light.\nJesus wept."
    ids = kjv.vocab.encode(text)
    assert ids.dtype == np.int64 and ids.max() < kjv.vocab.size
    assert kjv.vocab.decode(ids) == text
    assert list(kjv.vocab.chars) == sorted(kjv.vocab.chars)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        kjv.vocab.encode("€")


def test_char_vocab_is_sorted_corpus_chars() -> None:
    vocab = CharVocab.from_texts(["cab", "ba!"])
    assert vocab.chars == ("!", "a", "b", "c") and vocab.size == 4
    assert vocab.encode("abc!").tolist() == [1, 2, 3, 0]


def test_text_data_dir(tmp_path: Path) -> None:
    (tmp_path / "b_second.txt").write_text("the quick brown fox " * 20, encoding="utf-8")
    (tmp_path / "a_first.txt").write_text("jumps over the lazy dog " * 20, encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a group")
    data = load_task_data("kjv", data_dir=tmp_path, block_size=16)
    assert data.group_names == ("a_first", "b_second")
    assert np.unique(data.train.groups).tolist() == [0, 1]
    assert data.train.inputs.shape[1:] == (16,)
    assert data.vocab.decode(data.train.inputs[0]).startswith("jumps over")


def test_text_data_dir_without_txt(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissing, match=r"no \*\.txt files"):
        load_task_data("kjv", data_dir=tmp_path)


# ---- partition -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_train() -> Split:
    return load_task_data("digits").train


def _assert_disjoint_complete(shards: list[np.ndarray], n: int) -> None:
    for shard in shards:
        assert shard.dtype == np.int64 and np.all(np.diff(shard) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(n))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "natural"])
def test_partition_disjoint_complete_deterministic(
    spec: str, digits_train: Split, kjv: TaskData
) -> None:
    split = kjv.train if spec == "natural" else digits_train
    shards = partition(split, 7, spec, seed=3)
    assert len(shards) == 7 and min(len(s) for s in shards) >= 2
    _assert_disjoint_complete(shards, len(split))
    again = partition(split, 7, parse_partition(spec), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5"])
def test_partition_differs_across_seeds(spec: str, digits_train: Split) -> None:
    a, b = partition(digits_train, 5, spec, seed=1), partition(digits_train, 5, spec, seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_shards_are_near_equal(digits_train: Split) -> None:
    sizes = [len(s) for s in partition(digits_train, 10, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def _mean_label_entropy(split: Split, shards: list[np.ndarray]) -> float:
    labels = split.targets.numpy()
    entropies = []
    for shard in shards:
        p = np.bincount(labels[shard], minlength=10) / len(shard)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_small_alpha_is_more_skewed(digits_train: Split) -> None:
    skewed = _mean_label_entropy(digits_train, partition(digits_train, 10, "dirichlet:0.1", 0))
    uniform = _mean_label_entropy(digits_train, partition(digits_train, 10, "dirichlet:100", 0))
    assert skewed < uniform - 0.5
    assert uniform > 0.95 * np.log(10)


def test_dirichlet_gives_up_clearly(digits_train: Split) -> None:
    with pytest.raises(ValueError, match="100 tries"):
        partition(digits_train, 200, "dirichlet:0.001", seed=0)


def test_dirichlet_rejects_text(kjv: TaskData) -> None:
    with pytest.raises(ValueError, match=re.escape("kjv supports iid|natural")):
        partition(kjv.train, 4, "dirichlet:0.5", seed=0)


def test_natural_one_group_per_shard(kjv: TaskData) -> None:
    shards = partition(kjv.train, 66, "natural", seed=0)
    groups = [np.unique(kjv.train.groups[s]) for s in shards]
    assert all(len(g) == 1 for g in groups)
    assert sorted(int(g[0]) for g in groups) == list(range(66))
    # Largest book (Psalms, group 18) goes first, to shard 0.
    assert groups[0].tolist() == [18]


def test_natural_largest_group_to_smallest_shard() -> None:
    groups = np.repeat(np.arange(4), [5, 3, 3, 1])
    split = Split(torch.zeros(12, 2), torch.zeros(12, dtype=torch.int64), groups)
    shards = partition(split, 2, "natural", seed=0)
    # 5 -> shard 0; 3 -> shard 1; 3 -> shard 1 (3 < 5); 1 -> shard 0 (5 < 6).
    assert [np.unique(groups[s]).tolist() for s in shards] == [[0, 3], [1, 2]]


def test_natural_errors(digits_train: Split, kjv: TaskData) -> None:
    with pytest.raises(ValueError, match="natural groups"):
        partition(digits_train, 3, "natural", seed=0)
    with pytest.raises(ValueError, match="67 shards from 66 groups"):
        partition(kjv.train, 67, "natural", seed=0)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "iid:2",
        "nat",
        "dirichlet",
        "dirichlet:",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:abc",
        "dirichlet:nan",
        "dirichlet:inf",
    ],
)
def test_bad_partition_specs(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(spec))) as err:
        parse_partition(spec)
    assert "dirichlet:ALPHA" in str(err.value)


def test_parse_partition_forms() -> None:
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition(" natural ") == PartitionSpec("natural")
    spec = parse_partition("dirichlet:0.5")
    assert spec == PartitionSpec("dirichlet", 0.5) and str(spec) == "dirichlet:0.5"


def test_too_many_shards(digits_train: Split) -> None:
    with pytest.raises(ValueError, match="fewer shards"):
        partition(digits_train, len(digits_train), "iid", seed=0)


def test_local_train_test() -> None:
    indices = np.arange(100, 200, dtype=np.int64)
    train, test = local_train_test(indices, seed=4)
    assert len(test) == 10 and len(train) == 90
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), indices)
    again = local_train_test(indices, seed=4)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert [len(p) for p in local_train_test(np.array([3, 9]), seed=0)] == [1, 1]
    assert [len(p) for p in local_train_test(np.array([3]), seed=0)] == [1, 0]


def test_split_subset(kjv: TaskData) -> None:
    part = kjv.train.subset(np.array([5, 0]))
    assert len(part) == 2
    assert torch.equal(part.inputs[1], kjv.train.inputs[0])
    assert part.groups is not None and part.groups.tolist() == [0, 0]
    with pytest.raises(ValueError, match="1-D integer"):
        kjv.train.subset(np.array([0.5]))
