"""Tests of peerd.algorithm.width (data-aware width, Co-S2P): the gates learn which units
matter, the derived widths fit the FLOPs budget of the uniform sub-model, plans with learned
widths still cover every entry, and bad widths from a peer are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peerd.algorithm.coverage import CoverageTracker
from peerd.algorithm.engine import sgd, train_step
from peerd.algorithm.plan import (
    Member,
    MSFusionPlanner,
    decode_widths,
    encode_widths,
    make_planner,
    width_group_names,
    width_groups,
)
from peerd.algorithm.submodel import Params, extract, init_params, parameter_count
from peerd.algorithm.width import (
    WidthConfig,
    _widths_at,
    derive_widths,
    flops_budget,
    learn_widths,
    unit_scores,
    widths_flops,
)
from peerd.config import ConfigError, SimConfig, TrainConfig
from peerd.data import Split, load_task_data
from peerd.models.base import ModelSpec
from peerd.models.cnn import CNNConfig, CNNSpec
from peerd.models.transformer import TransformerConfig, TransformerSpec
from peerd.net.discovery import TXT_VALUE_LIMIT, PeerRecord

CNN = CNNSpec(CNNConfig(image_size=8, stage_widths=(16, 32)))
CNN_EXITS = CNNSpec(CNNConfig(image_size=8, stage_widths=(16, 32), early_exits=True))
TRANSFORMER = TransformerSpec(TransformerConfig(vocab_size=16, block_size=8, n_layer=2,
                                                n_head=4, head_dim=4, d_model=16, d_ffn=32))
TRAIN = TrainConfig(lr=0.05, batch_size=32)


@pytest.fixture(scope="module")
def digits() -> Split:
    return load_task_data("digits", None).train.subset(np.arange(256))


def trained_cnn(data: Split) -> Params:
    """The CNN after 3 epochs on `data` (about 0.8 training accuracy): its units matter."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = CNN.build({name: group.units for name, group in CNN.groups.items()})
        optimizer = sgd(module, TRAIN)
        for _ in range(3):
            for start in range(0, len(data), TRAIN.batch_size):
                batch = slice(start, start + TRAIN.batch_size)
                train_step(CNN.kind, TRAIN, module, optimizer, data.inputs[batch],
                           data.targets[batch])
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_a_unit_that_does_nothing_gets_the_lowest_score(digits: Split) -> None:
    params = trained_cnn(digits)
    # Unit 2 of the last block's middle group: nothing reads it (conv2's input channels zero).
    dead, span = 2, CNN.groups["s1b0.mid"].span
    params["blocks.1.conv2.weight"][:, dead * span:(dead + 1) * span] = 0.0

    scores = unit_scores(CNN, params, digits, TRAIN, 0.5, config=WidthConfig(epochs=5))

    mid = scores["s1b0.mid"]
    assert int(mid.argmin()) == dead, mid
    others = torch.cat([mid[:dead], mid[dead + 1:]])
    # The task holds the units it uses well above the one it does not.
    assert float(mid[dead]) < 0.2, mid
    assert float(others.min()) > float(mid[dead]) + 0.2, mid


@pytest.mark.parametrize(("spec", "depth"), [(CNN, None), (CNN_EXITS, 1), (TRANSFORMER, None)])
@pytest.mark.parametrize("mu", [0.125, 0.25, 0.5])
def test_derived_widths_are_the_widest_that_fit_the_budget(
    spec: ModelSpec, depth: int | None, mu: float,
) -> None:
    generator = torch.Generator().manual_seed(int(mu * 1000))
    scores = {g.name: torch.rand(g.units, generator=generator) for g in width_groups(spec.groups)}
    budget = flops_budget(spec, mu, depth)

    widths = derive_widths(spec, scores, budget, depth)

    assert widths_flops(spec, widths, depth) <= budget
    # Brute force over every threshold: the widths are those of the lowest one that fits, so
    # one unit more (the next lower threshold) would not fit.
    thresholds = np.unique(torch.cat(list(scores.values())).numpy())
    fits = [widths_flops(spec, _widths_at(spec, scores, float(t)), depth) <= budget
            for t in thresholds]
    first = fits.index(True)
    assert widths == _widths_at(spec, scores, float(thresholds[first]))
    assert first > 0 and not any(fits[:first])



def test_learned_widths_fit_the_budget_on_real_data(digits: Split) -> None:
    params = init_params(CNN, 0)
    widths = learn_widths(CNN, params, digits.subset(np.arange(64)), TRAIN, 0.25,
                          config=WidthConfig(epochs=1))
    assert [name for name, _ in widths] == [g.name for g in width_groups(CNN.groups)]
    assert widths_flops(CNN, widths) <= flops_budget(CNN, 0.25)
    # Physically smaller: the sub-model a plan of these widths cuts holds fewer parameters.
    plan = MSFusionPlanner(0).plan(0, [Member("w", 0.25, None, widths)], CNN.groups)["w"]
    assert [int(plan[name].numel()) for name, _ in widths] == encode_widths(widths)
    full = parameter_count(CNN.build({n: g.units for n, g in CNN.groups.items()}))
    assert parameter_count(extract(CNN, params, plan)) < full / 2


def skewed_widths(spec: ModelSpec, mu: float, seed: int) -> tuple[tuple[str, int], ...]:
    """A non-uniform split: random scores through derive_widths."""
    generator = torch.Generator().manual_seed(seed)
    scores = {g.name: torch.rand(g.units, generator=generator) for g in width_groups(spec.groups)}
    return derive_widths(spec, scores, flops_budget(spec, mu))


@pytest.mark.parametrize("spec", [CNN, TRANSFORMER], ids=["cnn", "transformer"])
def test_plans_with_learned_widths_cover_every_entry(spec: ModelSpec) -> None:
    mus = [(0.125, 0.25, 0.5)[i % 3] for i in range(6)]
    members = [Member(f"peer-{i}", mu, None, skewed_widths(spec, mu, i))
               for i, mu in enumerate(mus)]
    tracker = CoverageTracker(spec, init_params(spec, 0))
    planner = MSFusionPlanner(0)
    for round_index in range(60):
        plans = planner.plan(round_index, members, spec.groups)
        for member in members:
            assert [int(plans[member.peer_id][name].numel())
                    for name, _ in member.widths] == encode_widths(member.widths)
        tracker.record(plans.values())
        if tracker.fraction == 1.0:
            break
    assert tracker.untrained() == {}
    assert round_index < 60


@pytest.mark.parametrize("method", ["msfusion", "fedrolex", "heterofl", "fd", "full"])
def test_every_method_takes_the_learned_widths(method: str) -> None:
    widths = skewed_widths(CNN, 0.25, 1)
    plans = make_planner(method, 0).plan(3, [Member("w", 0.25, None, widths)], CNN.groups)
    counts = [int(plans["w"][name].numel()) for name, _ in widths]
    expected = [g.units for g in width_groups(CNN.groups)] if method == "full" else [
        kept for _, kept in widths]
    assert counts == expected


@pytest.mark.parametrize(("widths", "message"), [
    ((("res0", 2), ("s0b0.mid", 2), ("res1", 2)), "learned widths for groups"),
    ((("res0", 2), ("s0b0.mid", 0), ("res1", 2), ("s1b0.mid", 2)),
     "learned width 0 of group s0b0.mid is outside 1..4"),
    ((("res0", 5), ("s0b0.mid", 2), ("res1", 2), ("s1b0.mid", 2)),
     "learned width 5 of group res0 is outside 1..4"),
    ((("res0", 2.5), ("s0b0.mid", 2), ("res1", 2), ("s1b0.mid", 2)),
     "learned width 2.5 of group res0"),
    ((("res1", 2), ("s0b0.mid", 2), ("res0", 2), ("s1b0.mid", 2)), "learned widths for groups"),
])
def test_bad_learned_widths_are_refused_naming_them(widths: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        MSFusionPlanner(0).plan(0, [Member("bad", 0.25, None, widths)], CNN.groups)


def test_widths_travel_as_counts_in_group_order() -> None:
    widths = skewed_widths(CNN, 0.25, 2)
    assert decode_widths(width_group_names(CNN.groups), encode_widths(widths)) == widths
    with pytest.raises(ValueError, match="3 learned widths for a model of 4 groups"):
        decode_widths(width_group_names(CNN.groups), [1, 2, 3])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("width_epochs", 0, "width_epochs=0 is invalid: must be an integer >= 1"),
    ("width_penalty", -1.0, "width_penalty=-1.0 is invalid: must be a positive number"),
    ("width_penalty", float("nan"), "width_penalty=nan is invalid"),
])
def test_bad_width_options_are_config_errors(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**{field: value})
    with pytest.raises(ConfigError, match=message):
        WidthConfig(**{field.removeprefix("width_"): value})


def test_the_txt_record_carries_widths_only_where_set() -> None:
    record = PeerRecord("a", "lab", 1, "fp", 0.25, "10.0.0.1", 7470, widths=(2, 1, 14, 3))
    txt = record.to_txt()
    assert txt["widths"] == "2,1,14,3"
    assert PeerRecord.from_txt(txt, "10.0.0.1", 7470) == record
    assert "widths" not in PeerRecord("a", "lab", 1, "fp", 0.25, "10.0.0.1", 7470).to_txt()
    with pytest.raises(ValueError, match="TXT key 'widths' is not a comma list of integers"):
        PeerRecord.from_txt({**txt, "widths": "2,,3"}, "10.0.0.1", 7470)
    with pytest.raises(ValueError, match="widths must be integers >= 1"):
        PeerRecord.from_txt({**txt, "widths": "2,0"}, "10.0.0.1", 7470)
    # A transformer of 12 layers (25 groups of up to 4 digits) still fits one TXT string.
    assert len(PeerRecord("a", "lab", 1, "fp", 0.25, "h", 1, widths=(3072,) * 25).to_txt()[
        "widths"]) <= TXT_VALUE_LIMIT
    with pytest.raises(ValueError, match="more than the 248 characters a TXT value holds"):
        PeerRecord("a", "lab", 1, "fp", 0.25, "h", 1, widths=(1000,) * 60)
