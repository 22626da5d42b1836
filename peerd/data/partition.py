"""Partitioning a split into per-peer shards.

Spec strings: ``iid`` (uniform random), ``dirichlet:ALPHA`` (label skew; smaller ALPHA is
more skewed) and ``natural`` (whole natural groups, e.g. books, per shard).
"""

from __future__ import annotations

import numpy as np

from peerd.data.datasets import Split, holdout_size
from peerd.partition_spec import PartitionSpec, parse_partition

_DIRICHLET_TRIES = 100


def partition(
    split: Split, num_shards: int, spec: str | PartitionSpec, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Disjoint shards covering every sample of ``split``: one sorted int64 index array each.

    Every shard gets at least ``min_size`` samples, else ValueError. ``natural`` is
    deterministic and does not use ``seed``.
    """
    if isinstance(spec, str):
        spec = parse_partition(spec)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if len(split) < num_shards * min_size:
        raise ValueError(
            f"cannot give {num_shards} shards >= {min_size} samples each from {len(split)} "
            "samples; use fewer shards"
        )
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        shards = np.array_split(rng.permutation(len(split)), num_shards)
    elif spec.kind == "dirichlet":
        assert spec.alpha is not None
        shards = _dirichlet(_class_labels(split), num_shards, spec.alpha, rng, min_size)
    else:
        shards = _natural(split, num_shards)
    _check_min_size(shards, spec, min_size)
    return [np.sort(s).astype(np.int64) for s in shards]


def _class_labels(split: Split) -> np.ndarray:
    if split.targets.ndim != 1:
        raise ValueError(
            "dirichlet partitioning needs one class label per sample, but this split has "
            f"targets of shape {tuple(split.targets.shape)} (text); kjv supports iid|natural"
        )
    return split.targets.numpy()


def _dirichlet(
    labels: np.ndarray, num_shards: int, alpha: float, rng: np.random.Generator, min_size: int
) -> list[np.ndarray]:
    """Per class, split its shuffled samples over shards in proportions drawn from Dir(alpha)."""
    classes = np.unique(labels)
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_shards, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for shard, piece in enumerate(np.split(members, cuts)):
                parts[shard].append(piece)
        shards = [np.concatenate(p) for p in parts]
        # Redraw rather than patch up, so that shards keep the Dirichlet label skew.
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise ValueError(
        f"no dirichlet:{alpha:g} draw in {_DIRICHLET_TRIES} tries gave all {num_shards} shards "
        f">= {min_size} samples; use a larger alpha or fewer shards"
    )


def _natural(split: Split, num_shards: int) -> list[np.ndarray]:
    """Whole groups, largest first, each to the currently smallest shard (lowest index on ties)."""
    if split.groups is None:
        raise ValueError(
            "natural partitioning needs natural groups (e.g. the books of kjv), but this "
            "task's samples have none; use iid or dirichlet:ALPHA"
        )
    group_ids, sizes = np.unique(split.groups, return_counts=True)
    if num_shards > len(group_ids):
        raise ValueError(
            f"natural partitioning cannot fill {num_shards} shards from {len(group_ids)} "
            f"groups; use at most {len(group_ids)} shards"
        )
    # Stable sort on -size: equal sizes keep ascending group id, so the result is deterministic.
    order = np.argsort(-sizes, kind="stable")
    shard_sizes = np.zeros(num_shards, dtype=np.int64)
    shard_groups: list[list[int]] = [[] for _ in range(num_shards)]
    for i in order:
        shard = int(np.argmin(shard_sizes))
        shard_groups[shard].append(int(group_ids[i]))
        shard_sizes[shard] += sizes[i]
    return [np.flatnonzero(np.isin(split.groups, g)) for g in shard_groups]


def _check_min_size(shards: list[np.ndarray], spec: PartitionSpec, min_size: int) -> None:
    sizes = [len(s) for s in shards]
    if min(sizes) < min_size:
        raise ValueError(
            f"partition {spec} gave a shard with {min(sizes)} samples, fewer than "
            f"min_size={min_size} (shard sizes {sizes}); use fewer shards or a smaller min_size"
        )


def local_train_test(
    indices: np.ndarray, seed: int, test_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Split one shard into the peer's own sorted train and test indices.

    The test part is ``test_fraction`` of the shard, at least 1 sample when the shard has
    >= 2 samples, and never the whole shard.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    indices = np.asarray(indices, dtype=np.int64)
    num_test = holdout_size(len(indices), test_fraction)
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[num_test:]), np.sort(shuffled[:num_test])
