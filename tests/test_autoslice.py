"""Automatic slicing (peerd/models/autoslice.py): the tables it derives equal the hand-written
ones of the built-in models, its sub-modules are physically smaller, BatchNorm statistics go
with their channels, and a module it cannot slice is named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peerd
from peerd.algorithm.plan import Member, MSFusionPlanner
from peerd.algorithm.submodel import extract, init_params, parameter_count, write_back
from peerd.models import CNNConfig, CNNSpec, ModelSpec, TransformerConfig, TransformerSpec
from peerd.models.autoslice import AutoSpec, SlicingError
from peerd.models.base import full_plan, full_units


def _derived(hand: ModelSpec, declaration: peerd.Slicing | None = None) -> AutoSpec:
    return AutoSpec(lambda: hand.build(full_units(hand)), hand.example_input(1)[0], hand.kind,
                    declaration)


def _renaming(hand: ModelSpec, derived: ModelSpec) -> dict[str, str]:
    """Hand group -> derived group, read off the two axis tables; fails on any disagreement."""
    assert set(derived.axes) == set(hand.axes)
    renaming: dict[str, str] = {}
    for name, axes in hand.axes.items():
        for hand_group, derived_group in zip(axes, derived.axes[name], strict=True):
            assert (hand_group is None) == (derived_group is None), name
            if hand_group is not None:
                assert renaming.setdefault(hand_group, derived_group) == derived_group, name
    return renaming


def _assert_equal_tables(hand: ModelSpec, derived: ModelSpec) -> None:
    renaming = _renaming(hand, derived)
    assert len(set(renaming.values())) == len(renaming) == len(hand.groups)  # a bijection
    assert set(renaming.values()) == set(derived.groups)
    for hand_name, derived_name in renaming.items():
        hand_group, derived_group = hand.groups[hand_name], derived.groups[derived_name]
        assert (derived_group.units, derived_group.span) == (hand_group.units, hand_group.span)


@pytest.mark.parametrize("cfg", [
    CNNConfig(image_size=8, stage_widths=(32, 64)),
    CNNConfig(image_size=8, stage_widths=(16, 32, 64), blocks_per_stage=2, channels_per_unit=2),
])
def test_the_cnns_derived_table_equals_its_hand_written_one(cfg: CNNConfig) -> None:
    """GroupNorm's norm groups give the span (channels_per_unit) with no declaration."""
    hand = CNNSpec(cfg)
    _assert_equal_tables(hand, _derived(hand))


def test_the_transformers_derived_table_equals_its_hand_written_one() -> None:
    """What the graph cannot know is declared: a head spans head_dim rows of q (spans), and the
    attention's forward reads its head count from an attribute (fit)."""
    cfg = TransformerConfig(vocab_size=40, block_size=16, n_layer=2, n_head=4, head_dim=8,
                            d_model=32, d_ffn=64)
    hand = TransformerSpec(cfg)
    declaration = peerd.Slicing(
        spans={"blocks.*.attn.q": cfg.head_dim},
        fit={"blocks.*.attn": lambda attn: setattr(attn, "heads",
                                                   attn.q.out_features // attn.head_dim)})
    _assert_equal_tables(hand, _derived(hand, declaration))


def test_a_forward_reading_a_width_from_an_attribute_is_named() -> None:
    cfg = TransformerConfig(vocab_size=40, block_size=16, n_layer=1, n_head=4, head_dim=8,
                            d_model=32, d_ffn=64)
    with pytest.raises(SlicingError, match=r"module blocks\.0\.attn fails at half width"):
        _derived(TransformerSpec(cfg), peerd.Slicing(spans={"blocks.*.attn.q": 8}))


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.hidden = nn.Linear(32, 64)
        self.back = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stream = self.inp(x)
        stream = stream + self.back(torch.relu(self.hidden(stream)))
        return self.out(self.norm(stream))


def _half_plan(spec: ModelSpec) -> dict[str, torch.Tensor]:
    return MSFusionPlanner(seed=3).plan(0, [Member("a", 0.5), Member("b", 0.5)],
                                        spec.groups)["a"]


def test_sub_modules_are_physically_smaller_and_write_back_is_exact() -> None:
    spec = AutoSpec(ResidualMLP, torch.zeros(12), "image")
    assert spec.axes["inp.weight"] == ("inp", None)  # the input features are never cut
    assert spec.axes["out.weight"] == (None, "inp")  # nor the classes; the stream is one group
    assert spec.axes["back.weight"] == ("inp", "hidden")
    assert spec.axes["norm.weight"] == ("inp",)
    params = init_params(spec, seed=0)
    plan = _half_plan(spec)
    sub = extract(spec, params, plan)
    assert sub.hidden.weight.shape == (32, 16) and sub.back.weight.shape == (16, 32)
    assert sub.norm.normalized_shape == (16,)
    assert parameter_count(sub) < 0.35 * sum(t.numel() for t in params.values())
    assert sub(torch.randn(5, 12)).shape == (5, 3)
    before = {name: tensor.clone() for name, tensor in params.items()}
    write_back(spec, params, plan, sub)
    assert all(torch.equal(before[name], params[name]) for name in params)


def test_the_full_plan_computes_the_users_model_exactly() -> None:
    torch.manual_seed(0)
    spec = AutoSpec(ResidualMLP, torch.zeros(12), "image")
    params = init_params(spec, seed=1)
    user = ResidualMLP()
    user.load_state_dict(params, strict=True)
    inputs = torch.randn(4, 12)
    assert torch.equal(extract(spec, params, full_plan(spec))(inputs), user(inputs))


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_batchnorm_statistics_are_sliced_with_their_channels() -> None:
    spec = AutoSpec(BatchNormNet, torch.zeros(1, 6, 6), "image")
    assert spec.axes["bn.running_mean"] == spec.axes["bn.running_var"] == ("conv",)
    params = init_params(spec, seed=0)
    plan = _half_plan(spec)
    sub = extract(spec, params, plan)
    assert sub.bn.running_mean.shape == (4,) and sub.bn.num_features == 4
    sub.train()
    sub(torch.randn(8, 1, 6, 6) + 3.0)  # moves the running statistics of the kept channels
    write_back(spec, params, plan, sub)
    kept = plan["conv"]
    dropped = torch.ones(8, dtype=torch.bool)
    dropped[kept] = False
    assert bool((params["bn.running_mean"][kept] != 0).all())
    assert bool((params["bn.running_mean"][dropped] == 0).all())


class OwnParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.gain = nn.Parameter(torch.ones(8))
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inp(x) * self.gain)


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.inp(x)
        hidden = self.attn(hidden, hidden, hidden)[0]
        return self.out(hidden + self.mlp(hidden)).mean(dim=1)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(x))


def test_tied_parameters_are_named() -> None:
    with pytest.raises(SlicingError, match=r"tokens\.weight and head\.weight are one tensor"):
        AutoSpec(Tied, torch.zeros(4, dtype=torch.long), "text")


def test_an_unsliceable_module_is_named_and_can_be_kept_whole() -> None:
    with pytest.raises(SlicingError, match=r"module \(the model\) cannot be sliced: a "
                                           r"OwnParameter with tensors of its own \(gain\)"):
        AutoSpec(OwnParameter, torch.zeros(4), "image")
    with pytest.raises(SlicingError, match=r"module attn cannot be sliced: nn.MultiheadAttention"):
        AutoSpec(WithAttention, torch.zeros(3, 4), "image")
    spec = AutoSpec(WithAttention, torch.zeros(3, 4), "image", peerd.Slicing(whole=("attn",)))
    # The stream the whole attention reads and writes stays whole; the MLP's hidden units not.
    assert spec.axes["attn.in_proj_weight"] == (None, None)
    assert spec.axes["inp.weight"] == (None, None)
    assert spec.axes["mlp.0.weight"] == ("mlp.0", None)
    sub = extract(spec, init_params(spec, 0), _half_plan(spec))
    assert sub.mlp[0].weight.shape == (16, 16)
    assert sub(torch.randn(2, 3, 4)).shape == (2, 2)


class Concatenating(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 16)
        self.left = nn.Linear(16, 8)
        self.right = nn.Linear(16, 6)
        self.joined = nn.Linear(14, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.hidden(x))
        return self.joined(torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], -1))


def test_an_axis_fed_by_a_concatenation_is_named_and_can_be_kept_whole() -> None:
    with pytest.raises(SlicingError, match=r"module joined cannot be sliced: weight axis 1 "
                                           r"has 14 entries but only (8|6) are coupled to"):
        AutoSpec(Concatenating, torch.zeros(4), "image")
    spec = AutoSpec(Concatenating, torch.zeros(4), "image", peerd.Slicing(whole=("joined",)))
    assert spec.axes["left.weight"] == (None, "hidden")
    assert spec.axes["joined.weight"] == (None, None)


class BareNorms(nn.Module):
    """Norms without tensors of their own: only their widths follow the slice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.group_norm = nn.GroupNorm(4, 8, affine=False)
        self.hidden = nn.Linear(8, 16)
        self.layer_norm = nn.LayerNorm(16, elementwise_affine=False)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.group_norm(self.conv(x))).mean(dim=(2, 3))
        return self.out(self.layer_norm(torch.relu(self.hidden(pooled))))


def test_norms_without_tensors_follow_the_slice() -> None:
    spec = AutoSpec(BareNorms, torch.zeros(1, 5, 5), "image")
    assert spec.groups["conv"].span == 2  # 8 channels in 4 norm groups
    assert spec.axes["hidden.weight"] == ("hidden", "conv")
    sub = extract(spec, init_params(spec, 0), _half_plan(spec))
    assert sub.layer_norm.normalized_shape == (8,)
    assert (sub.group_norm.num_channels, sub.group_norm.num_groups) == (4, 2)
    assert sub(torch.randn(3, 1, 5, 5)).shape == (3, 2)
