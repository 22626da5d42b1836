"""Tests of the sliceable models and the sub-model machinery (peerd.models,
peerd.algorithm.submodel).

The specs are small but real: the 8x8 digits CNN, the 28x28 Fashion-MNIST CNN and a tiny
transformer; the task-sized transformer appears only where FLOP ratios are measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch
from support import random_plan

from peerd.agreement import fingerprint_mismatch
from peerd.algorithm.plan import Member, make_planner
from peerd.algorithm.submodel import (
    entry_indices,
    entry_mask,
    extract,
    forward_flops_per_sample,
    init_params,
    parameter_count,
    write_back,
)
from peerd.models import (
    CNNConfig,
    CNNSpec,
    ModelSpec,
    Plan,
    TransformerConfig,
    TransformerSpec,
    check_table,
    fingerprint,
    full_plan,
    full_units,
    plan_units,
)
from peerd.models.layers import ScaledConv2d, ScaledLinear

CNN8 = CNNSpec(CNNConfig(image_size=8, stage_widths=(32, 64)))
CNN28 = CNNSpec(CNNConfig(image_size=28, stage_widths=(16, 32, 64), channels_per_unit=2))
TINY_LM = TransformerSpec(
    TransformerConfig(
        vocab_size=20, block_size=8, n_layer=2, n_head=4, head_dim=8, d_model=32, d_ffn=64
    )
)
TASK_LM = TransformerSpec(TransformerConfig(vocab_size=63))

SPECS: dict[str, ModelSpec] = {"cnn8": CNN8, "cnn28": CNN28, "tiny_lm": TINY_LM}
CNN_SPECS = {"cnn8": CNN8, "cnn28": CNN28}


def spec_params(ids: Mapping[str, ModelSpec]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("spec", list(ids.values()), ids=list(ids))


# ---- helpers ---------------------------------------------------------------------------------


def msfusion_plans(spec: ModelSpec, mu: float, peers: int, round_index: int) -> list[Plan]:
    members = [Member(f"peer{i}", mu) for i in range(peers)]
    plans = make_planner("msfusion", seed=7).plan(round_index, members, spec.groups)
    return [plans[member.peer_id] for member in members]


def some_plans(spec: ModelSpec, seed: int) -> list[Plan]:
    """Several plans: random subsets and msfusion windows at two widths."""
    generator = torch.Generator().manual_seed(seed)
    plans = [random_plan(spec, generator) for _ in range(4)]
    plans += msfusion_plans(spec, 0.5, 3, round_index=seed)[:2]
    plans += msfusion_plans(spec, 0.25, 4, round_index=seed + 1)[:2]
    return plans


def random_params(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Full parameters with distinct random values (norm weights are not all ones)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(tensor.shape, generator=generator)
        for name, tensor in init_params(spec, 0).items()
    }


def sliced_reference(spec: ModelSpec, tensor: torch.Tensor, plan: Plan, name: str) -> torch.Tensor:
    """The plan's slice of one tensor: positions whose unit (position // span) the plan keeps."""
    positions = []
    for axis, group_name in enumerate(spec.axes[name]):
        if group_name is None:
            positions.append(list(range(tensor.shape[axis])))
            continue
        span = spec.groups[group_name].span
        kept = set(plan[group_name].tolist())
        positions.append([i for i in range(tensor.shape[axis]) if i // span in kept])
    for axis, kept_positions in enumerate(positions):
        tensor = tensor.index_select(axis, torch.tensor(kept_positions, dtype=torch.int64))
    return tensor


# ---- 1. the table ----------------------------------------------------------------------------


@spec_params({**SPECS, "task_lm": TASK_LM})
def test_check_table_passes_and_names_exactly_the_parameters(spec: ModelSpec) -> None:
    check_table(spec)
    module = spec.build(full_units(spec))
    params = dict(module.named_parameters())
    assert set(spec.axes) == set(params)
    for name, tensor in params.items():
        axes = spec.axes[name]
        assert len(axes) == tensor.dim(), name
        for size, group_name in zip(tensor.shape, axes, strict=True):
            if group_name is not None:
                group = spec.groups[group_name]
                assert group.units * group.span == size, name
    # Every group slices at least one parameter: no dead rows in the table.
    used = {group for axes in spec.axes.values() for group in axes if group is not None}
    assert used == set(spec.groups)


class _BrokenSpec:
    """A CNN spec whose axis table is edited, to show check_table rejects it."""

    kind = "image"

    def __init__(self, base: CNNSpec, axes: dict[str, tuple[str | None, ...]]) -> None:
        self.base = base
        self.groups = base.groups
        self.axes = axes

    def build(self, units: Mapping[str, int]) -> torch.nn.Module:
        return self.base.build(units)

    def example_input(self, batch: int) -> torch.Tensor:
        return self.base.example_input(batch)


def test_check_table_rejects_a_wrong_table() -> None:
    missing = {k: v for k, v in CNN8.axes.items() if k != "head.bias"}
    with pytest.raises(ValueError, match="untabled"):
        check_table(_BrokenSpec(CNN8, missing))
    extra = {**CNN8.axes, "head.extra": (None,)}
    with pytest.raises(ValueError, match="unknown"):
        check_table(_BrokenSpec(CNN8, extra))
    wrong_rank = {**CNN8.axes, "head.bias": (None, None)}
    with pytest.raises(ValueError, match="axes tabled"):
        check_table(_BrokenSpec(CNN8, wrong_rank))
    # res1 has 16 units of 4 channels = 64 entries; the stem has 32 output channels.
    wrong_group = {**CNN8.axes, "stem.0.weight": ("res1", None, None, None)}
    with pytest.raises(ValueError, match="does not match"):
        check_table(_BrokenSpec(CNN8, wrong_group))


# ---- 2. extract / write_back -----------------------------------------------------------------


@spec_params(SPECS)
def test_extract_takes_exactly_the_slice(spec: ModelSpec) -> None:
    params = random_params(spec, 1)
    for plan in some_plans(spec, 1)[:3]:
        module = extract(spec, params, plan)
        for name, parameter in module.named_parameters():
            expected = sliced_reference(spec, params[name], plan, name)
            assert torch.equal(parameter.detach(), expected), name


@spec_params(SPECS)
def test_extract_then_write_back_is_identity(spec: ModelSpec) -> None:
    params = random_params(spec, 2)
    original = {name: tensor.clone() for name, tensor in params.items()}
    for plan in some_plans(spec, 2):
        module = extract(spec, params, plan)
        write_back(spec, params, plan, module)
        for name, tensor in params.items():
            assert torch.equal(tensor, original[name]), name


@spec_params(SPECS)
def test_write_back_changes_exactly_the_plan_entries(spec: ModelSpec) -> None:
    for plan_index, plan in enumerate(some_plans(spec, 3)):
        params = random_params(spec, 3)
        original = {name: tensor.clone() for name, tensor in params.items()}
        module = extract(spec, params, plan)
        generator = torch.Generator().manual_seed(plan_index)
        deltas = {}
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                # A known, nowhere-zero delta: every held entry must visibly change.
                delta = torch.rand(parameter.shape, generator=generator) + 0.5
                deltas[name] = delta
                parameter.add_(delta)
        # The module holds copies: training it does not touch the full parameters.
        for name, tensor in params.items():
            assert torch.equal(tensor, original[name]), name
        write_back(spec, params, plan, module)
        for name, tensor in params.items():
            mask = entry_mask(spec, plan, name, tensor.shape)
            sliced = sliced_reference(spec, original[name], plan, name)
            assert int(mask.sum()) == sliced.numel() == deltas[name].numel()
            assert torch.equal(tensor[~mask], original[name][~mask]), name
            # Boolean indexing is row-major, as is the slice of sorted unit indices.
            expected = (sliced + deltas[name]).reshape(-1)
            assert torch.equal(tensor[mask], expected), name
            assert bool((tensor[mask] != original[name][mask]).all()), name


# ---- 3. physically small ---------------------------------------------------------------------


@spec_params(SPECS)
@pytest.mark.parametrize("mu", [0.5, 0.25])
def test_sub_model_has_sliced_shapes(spec: ModelSpec, mu: float) -> None:
    params = init_params(spec, 0)
    for plan in msfusion_plans(spec, mu, 4, round_index=3):
        for group_name, units in plan_units(plan).items():
            assert units == spec.groups[group_name].units * mu
        module = extract(spec, params, plan)
        for name, parameter in module.named_parameters():
            full_shape = params[name].shape
            expected = [
                size if group is None else round(size * mu)
                for size, group in zip(full_shape, spec.axes[name], strict=True)
            ]
            assert list(parameter.shape) == expected, name


def test_cnn_conv_weights_have_a_quarter_of_the_channels_at_mu_quarter() -> None:
    plan = msfusion_plans(CNN8, 0.25, 4, round_index=0)[0]
    module = extract(CNN8, init_params(CNN8, 0), plan)
    # Full: stem 1->32, block0 32->32->32, block1 32->64->64 (+ 1x1 shortcut 32->64).
    assert module.stem[0].weight.shape == (8, 1, 3, 3)
    assert module.blocks[0].conv1.weight.shape == (8, 8, 3, 3)
    assert module.blocks[0].conv2.weight.shape == (8, 8, 3, 3)
    assert module.blocks[1].conv1.weight.shape == (16, 8, 3, 3)
    assert module.blocks[1].conv2.weight.shape == (16, 16, 3, 3)
    assert module.blocks[1].shortcut[0].weight.shape == (16, 8, 1, 1)
    assert module.head.weight.shape == (10, 16)


@spec_params(SPECS)
@pytest.mark.parametrize("mu", [0.5, 0.25])
def test_parameter_count_falls_with_mu_squared(spec: ModelSpec, mu: float) -> None:
    params = init_params(spec, 0)
    full_count = sum(t.numel() for t in params.values())
    # Tensors sliced along two axes (conv kernels, projections) shrink by mu^2. Tensors sliced
    # along one axis (norm affines, biases, embeddings over the vocabulary, the stem over one
    # input channel, the head over the classes) shrink only by mu, and tensors sliced along
    # none (the head bias) keep their size. Their share of the full count bounds the excess
    # over mu^2: it is computed from the table, and must itself be small.
    excess = 0.0
    for name, tensor in params.items():
        sliced_axes = sum(group is not None for group in spec.axes[name])
        if sliced_axes < 2:
            excess += tensor.numel() * mu**sliced_axes / full_count
    assert excess < 0.05
    for plan in msfusion_plans(spec, mu, 4, round_index=1):
        ratio = parameter_count(extract(spec, params, plan)) / full_count
        assert mu**2 * 0.9 <= ratio <= mu**2 * 1.3 + excess


@spec_params(SPECS)
def test_sub_model_layers_scale_by_full_over_kept_inputs(spec: ModelSpec) -> None:
    """Each sliced layer rescales its input by full/kept units of the input's group, so a
    slice's activations keep the full model's magnitude; the classifier head (and every exit)
    by sqrt(full/kept), so that its logits' step per SGD step stays the full model's."""
    for plan in some_plans(spec, 8)[:4]:
        module = extract(spec, init_params(spec, 0), plan)
        scaled = 0
        for module_name, layer in module.named_modules():
            if not isinstance(layer, ScaledLinear | ScaledConv2d):
                continue
            input_group = spec.axes[f"{module_name}.weight"][1]
            expected = 1.0
            if input_group is not None:
                expected = spec.groups[input_group].units / plan[input_group].numel()
            if module_name == "head" or module_name.startswith("exits."):
                expected = math.sqrt(expected)
            assert layer.scale == pytest.approx(expected), module_name
            scaled += 1
        assert scaled > 0
        if isinstance(spec, TransformerSpec):
            # The tied LM head reads the residual stream.
            assert module.head_scale == pytest.approx(
                math.sqrt(spec.cfg.d_model / plan["embd"].numel()))


# ---- 4. FLOPs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "mu", "bound"),
    [
        (CNN8, 0.5, 0.35),
        (CNN8, 0.25, 0.10),
        (CNN28, 0.5, 0.35),
        (CNN28, 0.25, 0.10),
        (TASK_LM, 0.5, 0.35),
        (TASK_LM, 0.25, 0.10),
    ],
    ids=["cnn8-0.5", "cnn8-0.25", "cnn28-0.5", "cnn28-0.25", "task_lm-0.5", "task_lm-0.25"],
)
def test_msfusion_flop_ratio(spec: ModelSpec, mu: float, bound: float) -> None:
    full = forward_flops_per_sample(spec, full_units(spec))
    assert full > 0
    for plan in msfusion_plans(spec, mu, 4, round_index=2):
        ratio = forward_flops_per_sample(spec, plan_units(plan)) / full
        assert 0 < ratio <= bound


def cnn8_flops(c0: int, m0: int, c1: int, m1: int) -> int:
    """Forward FLOPs of the 8x8 CNN by hand, for res0/mid0/res1/mid1 channel counts.

    A conv with k x k kernels from c_in to c_out channels producing an h x w map does
    h*w*c_out*c_in*k*k multiply-adds; a linear layer from n to m features does n*m. Each
    multiply-add counts as 2 FLOPs (FlopCounterMode's convention); norms, ReLU, the input
    scaling, pooling and biases count nothing.
    """
    stem = 2 * (8 * 8) * c0 * 1 * 9  # 3x3 conv, 1 input channel, stride 1: 8x8 map
    block0_conv1 = 2 * (8 * 8) * m0 * c0 * 9  # stride 1, same map
    block0_conv2 = 2 * (8 * 8) * c0 * m0 * 9  # no shortcut conv: 32 -> 32 at stride 1
    block1_conv1 = 2 * (4 * 4) * m1 * c0 * 9  # stride 2: the map halves to 4x4
    block1_conv2 = 2 * (4 * 4) * c1 * m1 * 9
    block1_shortcut = 2 * (4 * 4) * c1 * c0 * 1  # 1x1 conv, stride 2
    head = 2 * c1 * 10  # pooled features -> 10 classes
    return stem + block0_conv1 + block0_conv2 + block1_conv1 + block1_conv2 + block1_shortcut + head


def test_cnn_flops_match_hand_count() -> None:
    # Full widths: 32, 32, 64, 64 channels.
    # stem 36_864 + block0 2 * 1_179_648 + block1 589_824 + 1_179_648 + 65_536 + head 1_280
    assert cnn8_flops(32, 32, 64, 64) == 4_232_448
    assert forward_flops_per_sample(CNN8, full_units(CNN8)) == 4_232_448
    # A quarter width: 2, 2, 4, 4 units of 4 channels.
    units = {"res0": 2, "s0b0.mid": 2, "res1": 4, "s1b0.mid": 4}
    assert forward_flops_per_sample(CNN8, units) == cnn8_flops(8, 8, 16, 16)


def tiny_lm_flops(include_attention: bool) -> int:
    """Forward FLOPs of the tiny transformer by hand: T=8 tokens, d=32, 4 heads of 8, ffn 64."""
    steps, d_model, heads, head_dim, ffn, vocab, layers = 8, 32, 4, 8, 64, 20, 2
    qkv = 3 * 2 * steps * d_model * heads * head_dim  # three d -> heads*head_dim projections
    proj = 2 * steps * heads * head_dim * d_model
    mlp = 2 * steps * d_model * ffn + 2 * steps * ffn * d_model  # up and down
    # q @ k^T and attn @ v: each heads * T * T * head_dim multiply-adds (causal masking still
    # computes the full product in FlopCounterMode's convention).
    attention = 2 * 2 * heads * steps * steps * head_dim
    per_layer = qkv + proj + mlp + (attention if include_attention else 0)
    lm_head = 2 * steps * d_model * vocab  # tied to the embedding, no bias
    return layers * per_layer + lm_head  # embeddings are lookups, not multiply-adds


def test_transformer_flops_match_hand_count() -> None:
    assert tiny_lm_flops(include_attention=True) == 288_768
    assert forward_flops_per_sample(TINY_LM, full_units(TINY_LM)) == 288_768


# ---- 5. forward ------------------------------------------------------------------------------


def example_batch(spec: ModelSpec, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(spec, TransformerSpec):
        cfg = spec.cfg
        return torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=generator)
    shape = spec.example_input(batch).shape
    return torch.randn(shape, generator=generator)


def output_shape(spec: ModelSpec, batch: int) -> tuple[int, ...]:
    if isinstance(spec, TransformerSpec):
        return (batch, spec.cfg.block_size, spec.cfg.vocab_size)
    assert isinstance(spec, CNNSpec)
    return (batch, spec.cfg.num_classes)


@spec_params(SPECS)
def test_sub_model_forward_shape(spec: ModelSpec) -> None:
    params = random_params(spec, 4)
    inputs = example_batch(spec, 3, seed=4)
    for plan in some_plans(spec, 4)[::2]:
        with torch.no_grad():
            out = extract(spec, params, plan)(inputs)
        assert out.shape == output_shape(spec, 3)
        assert bool(torch.isfinite(out).all())


@spec_params(SPECS)
def test_full_plan_sub_model_is_bit_identical_to_the_full_model(spec: ModelSpec) -> None:
    params = random_params(spec, 5)
    full_module = spec.build(full_units(spec))
    full_module.load_state_dict(params)
    sub_module = extract(spec, params, full_plan(spec))
    inputs = example_batch(spec, 4, seed=5)
    with torch.no_grad():
        assert torch.equal(sub_module(inputs), full_module(inputs))


@spec_params(CNN_SPECS)
def test_group_norm_is_per_unit_so_kept_stem_channels_match(spec: CNNSpec) -> None:
    params = random_params(spec, 6)
    full_module = extract(spec, params, full_plan(spec))
    inputs = example_batch(spec, 4, seed=6)
    generator = torch.Generator().manual_seed(6)
    for _ in range(3):
        plan = random_plan(spec, generator)
        # Keep a strict subset of every group, so each norm group of the sub-model differs.
        for name, group in spec.groups.items():
            if plan[name].numel() == group.units:
                plan[name] = plan[name][1:]
        kept_channels = entry_indices(spec.groups["res0"], plan["res0"])
        with torch.no_grad():
            sub_stem = extract(spec, params, plan).stem(inputs)
            full_stem = full_module.stem(inputs)
        assert sub_stem.shape[1] == kept_channels.numel()
        # Same statistics per unit: equal up to float rounding, where norm groups spanning
        # several units would differ by O(1).
        torch.testing.assert_close(sub_stem, full_stem[:, kept_channels], rtol=1e-6, atol=1e-6)


# ---- 6. fingerprint --------------------------------------------------------------------------


def test_fingerprint_is_stable_and_distinguishes_the_specs() -> None:
    prints = {name: fingerprint(spec) for name, spec in {**SPECS, "task_lm": TASK_LM}.items()}
    assert len(set(prints.values())) == len(prints)
    for name, spec in SPECS.items():
        assert fingerprint(spec) == prints[name]
        # A fresh spec of the same config is the same model.
        assert fingerprint(type(spec)(spec.cfg)) == prints[name]
    for value in prints.values():
        parts = value.split("-")
        assert len(parts) == 4 and all(len(part) == 4 for part in parts)
        [int(part, 16) for part in parts]


def test_a_fingerprint_mismatch_names_what_differs() -> None:
    narrow = fingerprint(CNNSpec(CNNConfig(image_size=8, stage_widths=(32, 64))))
    wide = fingerprint(CNNSpec(CNNConfig(image_size=8, stage_widths=(32, 128))))
    assert fingerprint_mismatch(wide, narrow).endswith(
        ": parameter shapes, unit groups and axes differ (another task or model)")
    other = fingerprint(TASK_LM)
    assert ": model family, parameter names, parameter shapes, unit groups and axes differ" in \
        fingerprint_mismatch(other, narrow)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (TransformerSpec(TransformerConfig(vocab_size=20)), TASK_LM),
        (TransformerSpec(TransformerConfig(vocab_size=63, block_size=32)), TASK_LM),
        (CNNSpec(CNNConfig(image_size=8, num_classes=3)), CNN8),
    ],
    ids=["vocab_size", "block_size", "num_classes"],
)
def test_fingerprint_distinguishes_unsliced_sizes(first: ModelSpec, second: ModelSpec) -> None:
    first_shapes = {n: tuple(p.shape) for n, p in first.build(full_units(first)).named_parameters()}
    second_shapes = {
        n: tuple(p.shape) for n, p in second.build(full_units(second)).named_parameters()
    }
    assert first_shapes != second_shapes  # different parameters: slices cannot be exchanged
    assert fingerprint(first) != fingerprint(second)


# ---- 7. init_params --------------------------------------------------------------------------


@spec_params(SPECS)
def test_init_params_is_deterministic_per_seed(spec: ModelSpec) -> None:
    first, again, other = init_params(spec, 11), init_params(spec, 11), init_params(spec, 12)
    assert set(first) == set(spec.axes)
    for name in first:
        assert torch.equal(first[name], again[name]), name
    # Random-initialised tensors (conv, linear, embedding weights) differ across seeds; norm
    # affines start at ones and zeros whatever the seed.
    random_names = [name for name in first if first[name].dim() >= 2]
    assert random_names
    for name in random_names:
        assert not torch.equal(first[name], other[name]), name


def test_init_params_returns_independent_tensors() -> None:
    params = init_params(TINY_LM, 0)
    for tensor in params.values():
        assert not tensor.requires_grad
    params["wte.weight"].add_(1.0)
    assert not torch.equal(params["wte.weight"], init_params(TINY_LM, 0)["wte.weight"])


@spec_params(SPECS)
def test_init_params_leaves_the_global_rng_alone(spec: ModelSpec) -> None:
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    expected = torch.rand(8)
    torch.random.set_rng_state(state)
    init_params(spec, 99)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(torch.rand(8), expected)
