"""Datasets, tokenisation and per-peer partitioning."""

from peerd.data.datasets import DatasetMissing, Split, TaskData, load_task_data
from peerd.data.partition import local_train_test, parse_partition, partition
from peerd.data.text import CharVocab

__all__ = [
    "CharVocab",
    "DatasetMissing",
    "Split",
    "TaskData",
    "load_task_data",
    "local_train_test",
    "parse_partition",
    "partition",
]
