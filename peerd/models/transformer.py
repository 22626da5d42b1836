"""A decoder-only transformer language model (nanoGPT-shaped), sliceable in every width.

Groups: the residual width `embd` (shared by embeddings, every LayerNorm, every projection in
and out of the stream, and the tied LM head), the attention heads of each layer (a unit spans
`head_dim` rows of q, k and v) and the FFN neurons of each layer. LayerNorm in a sub-model
normalises over the kept residual width: its mean and variance over a slice estimate those of
the full width, and there are no running statistics to go stale.

With `early_exits`, layer k ends in an exit `exits.k`: its own LayerNorm followed by the tied LM
head shared by every exit (the deepest exit's norm replaces `ln_f`). A separate vocabulary
projection per exit would add vocab x d_model parameters per layer and exchange them; the shared
head keeps exits at 2 x d_model parameters each, and the depth group lets a sub-model keep only
its first d layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from peerd.models.base import DEPTH, UnitGroup
from peerd.models.layers import ScaledLinear, head_scale, input_scale

EMBD = "embd"


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 8
    head_dim: int = 32
    d_model: int = 256
    d_ffn: int = 1024
    early_exits: bool = False  # an exit after every layer, and depth pruning


def _heads_group(layer: int) -> str:
    return f"l{layer}.heads"


def _ffn_group(layer: int) -> str:
    return f"l{layer}.ffn"


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, head_dim: int, scales: tuple[float, float]):
        super().__init__()
        embd_scale, heads_scale = scales
        self.heads = heads
        self.head_dim = head_dim
        self.q = ScaledLinear(d_model, heads * head_dim, True, embd_scale)
        self.k = ScaledLinear(d_model, heads * head_dim, True, embd_scale)
        self.v = ScaledLinear(d_model, heads * head_dim, True, embd_scale)
        self.proj = ScaledLinear(heads * head_dim, d_model, True, heads_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, steps, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.proj(out.transpose(1, 2).reshape(batch, steps, self.heads * self.head_dim))


class Block(nn.Module):
    def __init__(
        self, d_model: int, heads: int, head_dim: int, ffn: int, scales: tuple[float, ...]
    ) -> None:
        super().__init__()
        embd_scale, heads_scale, ffn_scale = scales
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, head_dim, (embd_scale, heads_scale))
        self.ln2 = nn.LayerNorm(d_model)
        self.up = ScaledLinear(d_model, ffn, True, embd_scale)
        self.down = ScaledLinear(ffn, d_model, True, ffn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


def _init_weights(module: nn.Module) -> None:
    # GPT-2's initialisation: N(0, 0.02) weights, zero biases. PyTorch's N(0, 1) embeddings
    # would make the tied LM head's logits explode.
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class TransformerLM(nn.Module):
    def __init__(
        self, cfg: TransformerConfig, units: Mapping[str, int], full: Mapping[str, int]
    ) -> None:
        super().__init__()

        def scale(group: str) -> float:
            return input_scale(full[group], units[group])

        d_model = units[EMBD]
        self.wte = nn.Embedding(cfg.vocab_size, d_model)
        self.wpe = nn.Embedding(cfg.block_size, d_model)
        self.blocks = nn.ModuleList(
            Block(
                d_model, units[_heads_group(i)], cfg.head_dim, units[_ffn_group(i)],
                (scale(EMBD), scale(_heads_group(i)), scale(_ffn_group(i))),
            )
            for i in range(units.get(DEPTH, cfg.n_layer))
        )
        self.early_exits = cfg.early_exits
        if cfg.early_exits:
            self.exits = nn.ModuleList(nn.LayerNorm(d_model) for _ in self.blocks)
        else:
            self.ln_f = nn.LayerNorm(d_model)
        self.head_scale = head_scale(full[EMBD], units[EMBD])
        self.apply(_init_weights)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.wte(tokens) + self.wpe(positions)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states [batch, steps, d_model], used by representation losses."""
        x = self._embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.exits[-1](x) if self.early_exits else self.ln_f(x)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        # The LM head is tied to the token embedding, as in GPT-2.
        return F.linear(features * self.head_scale, self.wte.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(tokens))

    def forward_exits(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every kept exit, shallowest first (early exits only)."""
        logits = []
        x = self._embed(tokens)
        for block, norm in zip(self.blocks, self.exits, strict=True):
            x = block(x)
            logits.append(self.logits(norm(x)))
        return logits


class TransformerSpec:
    kind = "text"

    def __init__(self, cfg: TransformerConfig) -> None:
        self.cfg = cfg

    @cached_property
    def groups(self) -> dict[str, UnitGroup]:
        cfg = self.cfg
        table = {EMBD: UnitGroup(EMBD, cfg.d_model)}
        for layer in range(cfg.n_layer):
            heads, ffn = _heads_group(layer), _ffn_group(layer)
            table[heads] = UnitGroup(heads, cfg.n_head, cfg.head_dim, layer)
            table[ffn] = UnitGroup(ffn, cfg.d_ffn, 1, layer)
        if cfg.early_exits:
            table[DEPTH] = UnitGroup(DEPTH, cfg.n_layer)
        return table

    @cached_property
    def axes(self) -> dict[str, tuple[str | None, ...]]:
        table: dict[str, tuple[str | None, ...]] = {
            "wte.weight": (None, EMBD),
            "wpe.weight": (None, EMBD),
        }
        norms = ([f"exits.{layer}" for layer in range(self.cfg.n_layer)]
                 if self.cfg.early_exits else ["ln_f"])
        for norm in norms:
            table[f"{norm}.weight"] = (EMBD,)
            table[f"{norm}.bias"] = (EMBD,)
        for layer in range(self.cfg.n_layer):
            heads, ffn, prefix = _heads_group(layer), _ffn_group(layer), f"blocks.{layer}"
            for norm in ("ln1", "ln2"):
                table[f"{prefix}.{norm}.weight"] = (EMBD,)
                table[f"{prefix}.{norm}.bias"] = (EMBD,)
            for projection in ("q", "k", "v"):
                table[f"{prefix}.attn.{projection}.weight"] = (heads, EMBD)
                table[f"{prefix}.attn.{projection}.bias"] = (heads,)
            table[f"{prefix}.attn.proj.weight"] = (EMBD, heads)
            table[f"{prefix}.attn.proj.bias"] = (EMBD,)
            table[f"{prefix}.up.weight"] = (ffn, EMBD)
            table[f"{prefix}.up.bias"] = (ffn,)
            table[f"{prefix}.down.weight"] = (EMBD, ffn)
            table[f"{prefix}.down.bias"] = (EMBD,)
        return table

    @cached_property
    def param_blocks(self) -> dict[str, int]:
        return {name: int(name.split(".")[1]) for name in self.axes
                if name.startswith(("blocks.", "exits."))}

    def build(self, units: Mapping[str, int]) -> TransformerLM:
        full = {name: group.units for name, group in self.groups.items()}
        return TransformerLM(self.cfg, units, full)

    def example_input(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.cfg.block_size, dtype=torch.long)
