"""Sliceable model families, each with one table of unit groups and parameter axes."""

from peerd.models.base import (
    ModelSpec,
    Plan,
    UnitGroup,
    check_table,
    fingerprint,
    full_plan,
    full_units,
    plan_units,
)
from peerd.models.cnn import CNNConfig, CNNSpec
from peerd.models.transformer import TransformerConfig, TransformerSpec

__all__ = [
    "CNNConfig",
    "CNNSpec",
    "ModelSpec",
    "Plan",
    "TransformerConfig",
    "TransformerSpec",
    "UnitGroup",
    "check_table",
    "fingerprint",
    "full_plan",
    "full_units",
    "plan_units",
]
