"""A ResNet-style CNN for grey images (8x8 digits, 28x28 Fashion-MNIST), sliceable by channels.

Normalisation is GroupNorm with one norm group per slicing unit (`channels_per_unit` channels).
A unit's statistics then depend only on its own channels, so a sub-model normalises its kept
channels exactly as the full model would: no running statistics to recalibrate, and any subset
of units is a valid width.

With `early_exits`, every residual block k ends in an exit head `exits.k` (pooled channels ->
linear, the deepest being the classifier) and the depth group lets a sub-model keep only its
first d blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from peerd.models.base import DEPTH, UnitGroup
from peerd.models.layers import ScaledConv2d, ScaledLinear, head_scale, input_scale


@dataclass(frozen=True)
class CNNConfig:
    image_size: int
    num_classes: int = 10
    in_channels: int = 1
    stage_widths: tuple[int, ...] = (32, 64)
    blocks_per_stage: int = 1
    channels_per_unit: int = 4
    early_exits: bool = False  # an exit head after every block, and depth pruning

    @property
    def blocks(self) -> int:
        return len(self.stage_widths) * self.blocks_per_stage

    def block_stage(self, index: int) -> int:
        return index // self.blocks_per_stage


def _residual_group(stage: int) -> str:
    return f"res{stage}"


def _mid_group(stage: int, block: int) -> str:
    return f"s{stage}b{block}.mid"


class ResidualBlock(nn.Module):
    def __init__(
        self, in_units: int, mid_units: int, out_units: int, stride: int, cfg: CNNConfig,
        scales: tuple[float, float],
    ) -> None:
        super().__init__()
        cpu = cfg.channels_per_unit
        in_scale, mid_scale = scales
        self.conv1 = ScaledConv2d(in_units * cpu, mid_units * cpu, 3, stride, in_scale)
        self.norm1 = nn.GroupNorm(mid_units, mid_units * cpu)
        self.conv2 = ScaledConv2d(mid_units * cpu, out_units * cpu, 3, 1, mid_scale)
        self.norm2 = nn.GroupNorm(out_units, out_units * cpu)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_units != out_units:
            self.shortcut = nn.Sequential(
                ScaledConv2d(in_units * cpu, out_units * cpu, 1, stride, in_scale),
                nn.GroupNorm(out_units, out_units * cpu),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + skip)


class ResNetCNN(nn.Module):
    def __init__(self, cfg: CNNConfig, units: Mapping[str, int], full: Mapping[str, int]) -> None:
        super().__init__()
        cpu = cfg.channels_per_unit

        def scale(group: str) -> float:
            return input_scale(full[group], units[group])

        stem_units = units[_residual_group(0)]
        self.stem = nn.Sequential(
            ScaledConv2d(cfg.in_channels, stem_units * cpu, 3, 1, 1.0),
            nn.GroupNorm(stem_units, stem_units * cpu),
            nn.ReLU(),
        )
        depth = units.get(DEPTH, cfg.blocks)
        streams = []  # the residual group each kept block writes
        blocks: list[nn.Module] = []
        previous = _residual_group(0)
        for index in range(depth):
            stage, block = cfg.block_stage(index), index % cfg.blocks_per_stage
            stride = 2 if stage > 0 and block == 0 else 1
            mid, res = _mid_group(stage, block), _residual_group(stage)
            blocks.append(
                ResidualBlock(
                    units[previous], units[mid], units[res], stride, cfg,
                    (scale(previous), scale(mid)),
                )
            )
            streams.append(res)
            previous = res
        self.blocks = nn.Sequential(*blocks)
        self.early_exits = cfg.early_exits

        def head(res: str) -> ScaledLinear:
            return ScaledLinear(units[res] * cpu, cfg.num_classes, True,
                                head_scale(full[res], units[res]))

        if cfg.early_exits:
            self.exits = nn.ModuleList(head(res) for res in streams)
        else:
            self.head = head(previous)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation (pooled channels), used by representation losses."""
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The deepest kept exit's classes (the model's output) from `features`."""
        classifier = self.exits[-1] if self.early_exits else self.head
        return classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every kept exit, shallowest first (early exits only)."""
        logits = []
        x = self.stem(x)
        for block, head in zip(self.blocks, self.exits, strict=True):
            x = block(x)
            logits.append(head(x.mean(dim=(2, 3))))
        return logits


class CNNSpec:
    kind = "image"

    def __init__(self, cfg: CNNConfig) -> None:
        if any(width % cfg.channels_per_unit for width in cfg.stage_widths):
            raise ValueError(
                f"stage widths {cfg.stage_widths} must be multiples of "
                f"channels_per_unit={cfg.channels_per_unit}"
            )
        self.cfg = cfg

    @cached_property
    def groups(self) -> dict[str, UnitGroup]:
        cpu = self.cfg.channels_per_unit
        table: dict[str, UnitGroup] = {}
        per_stage = self.cfg.blocks_per_stage
        for stage, width in enumerate(self.cfg.stage_widths):
            res = _residual_group(stage)
            # res0 also feeds the stem; a later stage's stream starts at its first block.
            first_block = None if stage == 0 else stage * per_stage
            table[res] = UnitGroup(res, width // cpu, cpu, first_block)
            for block in range(per_stage):
                mid = _mid_group(stage, block)
                table[mid] = UnitGroup(mid, width // cpu, cpu, stage * per_stage + block)
        if self.cfg.early_exits:
            table[DEPTH] = UnitGroup(DEPTH, self.cfg.blocks)
        return table

    @cached_property
    def axes(self) -> dict[str, tuple[str | None, ...]]:
        res0 = _residual_group(0)
        table: dict[str, tuple[str | None, ...]] = {
            "stem.0.weight": (res0, None, None, None),
            "stem.1.weight": (res0,),
            "stem.1.bias": (res0,),
        }
        previous = res0
        index = 0
        for stage in range(len(self.cfg.stage_widths)):
            res = _residual_group(stage)
            for block in range(self.cfg.blocks_per_stage):
                mid = _mid_group(stage, block)
                prefix = f"blocks.{index}"
                table[f"{prefix}.conv1.weight"] = (mid, previous, None, None)
                table[f"{prefix}.norm1.weight"] = (mid,)
                table[f"{prefix}.norm1.bias"] = (mid,)
                table[f"{prefix}.conv2.weight"] = (res, mid, None, None)
                table[f"{prefix}.norm2.weight"] = (res,)
                table[f"{prefix}.norm2.bias"] = (res,)
                if stage > 0 and block == 0:
                    table[f"{prefix}.shortcut.0.weight"] = (res, previous, None, None)
                    table[f"{prefix}.shortcut.1.weight"] = (res,)
                    table[f"{prefix}.shortcut.1.bias"] = (res,)
                previous = res
                index += 1
        heads = ({f"exits.{index}": _residual_group(self.cfg.block_stage(index))
                  for index in range(self.cfg.blocks)}
                 if self.cfg.early_exits else {"head": previous})
        for head, res in heads.items():
            table[f"{head}.weight"] = (None, res)
            table[f"{head}.bias"] = (None,)
        return table

    @cached_property
    def param_blocks(self) -> dict[str, int]:
        return {name: int(name.split(".")[1]) for name in self.axes
                if name.startswith(("blocks.", "exits."))}

    def build(self, units: Mapping[str, int]) -> ResNetCNN:
        full = {name: group.units for name, group in self.groups.items()}
        return ResNetCNN(self.cfg, units, full)

    def example_input(self, batch: int) -> torch.Tensor:
        size = self.cfg.image_size
        return torch.zeros(batch, self.cfg.in_channels, size, size)
