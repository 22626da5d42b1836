"""A user's small GPT-style transformer on text: the King James Bible, character by character.

Plain torch layers; the one thing the graph cannot know is declared: an attention head spans
HEAD_DIM rows of q, k and v (`peerd.Slicing(spans=...)`). The forward derives the head count
from q's width, so a sub-model with fewer heads runs as it is (docs/MODELS.md, Automatic
slicing). Run it with

    peerd sim --task examples/gpt_text.py:task --rounds 20 --out runs/gpt
    peerd export --from runs/gpt --out gpt.safetensors

`small_task` is the same model at a size CI trains in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import peerd
from peerd.data import load_task_data

HEAD_DIM = 16
BLOCK_SIZE = 64


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, heads * HEAD_DIM)
        self.k = nn.Linear(width, heads * HEAD_DIM)
        self.v = nn.Linear(width, heads * HEAD_DIM)
        self.proj = nn.Linear(heads * HEAD_DIM, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        heads = self.q.out_features // HEAD_DIM

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, steps, heads, HEAD_DIM).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)),
                                             split(self.v(x)), is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, steps, heads * HEAD_DIM))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(BLOCK_SIZE, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(steps)
        return self.head(self.ln_f(self.blocks(x)))


def task(width: int = 128, heads: int = 8, layers: int = 4, train_windows: int | None = None,
         test_windows: int = 256) -> peerd.Task:
    text = load_task_data("kjv", block_size=BLOCK_SIZE)
    train, test = text.train, text.test
    vocab = text.num_classes
    return peerd.Task(
        name="gpt-text", model=lambda: GPT(vocab, width, heads, layers),
        train=TensorDataset(train.inputs[:train_windows], train.targets[:train_windows]),
        test=TensorDataset(test.inputs[:test_windows], test.targets[:test_windows]),
        metric="perplexity", batch_size=32, lr=0.05, local_steps=20,
        slicing=peerd.Slicing(spans={"blocks.*.attn.q": HEAD_DIM}),
    )


def small_task() -> peerd.Task:
    return task(width=32, heads=2, layers=1, train_windows=300, test_windows=64)
