"""What every member of a cluster must share, folded into the one fingerprint peers compare.

Every peer computes every member's plan locally (DESIGN.md, Words: plan), so two peers with
different planner settings would each expect slices the other never sends. The fingerprint a
daemon announces (mDNS record, handshake, stream headers, checkpoints) is therefore the model's
digest joined by a dot to a digest of the options declared `agreed` in peerd/config.py (and
nothing else); a mismatch names the half that differs.
"""

from __future__ import annotations

import hashlib
import json

from peerd.config import DaemonConfig, PeerOptions
from peerd.models.base import FINGERPRINT_PARTS
from peerd.options import option_fields, spec_of

_SEPARATOR = "."
_SHOWN_CHARS = 40  # of a peer's fingerprint in an error: a hostile one must not flood logs


def agreed_settings(config: PeerOptions) -> dict[str, object]:
    """The options declared `agreed` (peerd/config.py); one declared for a planner only counts
    under its method, so peers of other methods may differ on it."""
    return {f.name: getattr(config, f.name) for f in option_fields(config)
            if spec_of(f).agreed and spec_of(f).planner in (None, config.method)}


def agreed_names(config_class: type = DaemonConfig) -> list[str]:
    return [f.name for f in option_fields(config_class) if spec_of(f).agreed]


def describe_settings(settings: dict[str, object]) -> str:
    return " ".join(f"{name}={value}" for name, value in settings.items())


def cluster_fingerprint(model_fingerprint: str, settings: dict[str, object]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{model_fingerprint}{_SEPARATOR}{digest}"


def fingerprint_mismatch(got: str, expected: str) -> str:
    """Why a peer announcing `got` cannot join a peer whose fingerprint is `expected`."""
    got_model, _, got_planner = (half[:_SHOWN_CHARS] for half in got.partition(_SEPARATOR))
    expected_model, _, expected_planner = expected.partition(_SEPARATOR)
    if got_model != expected_model:
        got_parts, expected_parts = got_model.split("-"), expected_model.split("-")
        differing = [what for what, got_part, expected_part
                     in zip(FINGERPRINT_PARTS, got_parts, expected_parts, strict=False)
                     if got_part != expected_part]
        what = (f"{', '.join(differing)} differ" if differing
                and len(got_parts) == len(FINGERPRINT_PARTS) else "the model differs")
        return (f"model fingerprint {got_model}, expected {expected_model}: {what} (another "
                f"task or model)")
    names = agreed_names()
    return (f"planner fingerprint {got_planner or '(none)'}, expected {expected_planner}: "
            f"{', '.join(names[:-1])} and {names[-1]} must be the same on every member")
