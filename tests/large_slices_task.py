"""A task for tests that need large slices quickly: one wide transformer block (9.5M
parameters, 38 MB) trained one step a round on a handful of random token windows. Its compute
is trivial; its slices are the size of a real model's."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import peerd
from peerd.models import TransformerConfig, TransformerSpec
from peerd.models.base import full_units

VOCAB = 16
BLOCK = 8


def task() -> peerd.Task:
    tokens = torch.randint(0, VOCAB, (48, BLOCK + 1),
                           generator=torch.Generator().manual_seed(0))
    windows = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    slicing = TransformerSpec(TransformerConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1,
                                                n_head=8, head_dim=64, d_model=512,
                                                d_ffn=8192))
    return peerd.Task(
        name="large-slices", model=lambda: slicing.build(full_units(slicing)),
        train=torch.utils.data.Subset(windows, range(40)),
        test=torch.utils.data.Subset(windows, range(40, 48)),
        metric="perplexity", batch_size=4, local_steps=1, lr=0.01, slicing=slicing)
