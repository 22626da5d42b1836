"""What a daemon keeps on disk: its stable peer id, a checkpoint after every round, its
parameters at shutdown and its per-round log.

Writes are atomic (temp file, fsync, rename) so that a crash leaves either the old or the
new file, never half of one. Parameters are safetensors, metadata JSON: no pickle.

A checkpoint is `checkpoints/round-NNNNNN.safetensors` (the parameters after that many rounds)
and `round-NNNNNN.json` (round, view, identity, the parameters' size and SHA-256, and a SHA-256
of the record itself), written in that order: the JSON commits the checkpoint. The engine builds
a fresh optimizer every round, so the parameters are its whole state. Loading checks every
digest, the tensor names and shapes and that all values are finite; a checkpoint that fails
is skipped with a warning naming the file and the reason, for the one before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

# torch and safetensors load where tensors are read or written: `peerd ca` (which uses this
# module's file helpers) must start in well under a second.
if TYPE_CHECKING:
    import torch

log = logging.getLogger("peerd.state")

T = TypeVar("T")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1
ROUNDS_LOG = "rounds.jsonl"
_CHECKPOINT_NAME = re.compile(r"round-(\d{6,})\.json")

# Peer ids and cluster names: safe in file names, mDNS instance names and log lines.
IDENTIFIER = re.compile(r"[A-Za-z0-9._-]{1,64}")


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    """`mode` (less the umask) applies from the file's creation: a private key written with
    0o600 is never readable by others, not even half-written."""
    atomic_write(path, lambda handle: handle.write(data), mode)


def atomic_write(path: Path, write: Callable[[BinaryIO], T], mode: int = 0o666) -> T:
    """`atomic_write_bytes` of what `write` writes to the open file (what it returns comes
    back): large files are written piece by piece, never held whole in memory."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as handle:
        result = write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)
    return result


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check_peer_id(peer_id: str) -> str:
    if not IDENTIFIER.fullmatch(peer_id):
        raise ValueError(
            f"peer id {peer_id!r} is invalid: use 1 to 64 letters, digits, '.', '_' or '-'"
        )
    return peer_id


def load_or_create_peer_id(state_dir: Path, requested: str | None = None) -> str:
    """The id persisted in the state dir; created on first start (or set by the user)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "peer_id"
    if requested is not None:
        check_peer_id(requested)
        atomic_write_bytes(path, requested.encode())
        return requested
    if path.exists():
        return check_peer_id(path.read_text().strip())
    peer_id = f"peer-{secrets.token_hex(4)}"
    atomic_write_bytes(path, peer_id.encode())
    return peer_id


def save_parameters(state_dir: Path, params: dict[str, torch.Tensor], meta: dict) -> None:
    """Parameters and their metadata (round, view, seed) as safetensors + JSON."""
    from peerd.tensorfile import write_safetensors

    atomic_write(state_dir / "params.safetensors",
                 lambda handle: write_safetensors(handle, params))
    atomic_write_bytes(state_dir / "state.json", json.dumps(meta, indent=2).encode())


# ---- per-round checkpoints ----------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated or corrupt."""


class CheckpointMismatch(ValueError):
    """A sound checkpoint of another task, model, method, seed or peer: resuming would be wrong."""


@dataclass(frozen=True)
class Checkpoint:
    round: int  # rounds done: the round a resumed peer starts at
    params: dict[str, torch.Tensor]
    record: dict  # the JSON record
    path: Path  # the JSON file


def _paths(state_dir: Path, round_index: int) -> tuple[Path, Path]:
    stem = state_dir / CHECKPOINT_DIR / f"round-{round_index:06d}"
    return stem.with_suffix(".json"), stem.with_suffix(".safetensors")


def _record_digest(record: Mapping[str, object]) -> str:
    body = {key: value for key, value in record.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def checkpoint_rounds(state_dir: Path) -> list[int]:
    """The rounds with a checkpoint record on disk (sound or not), oldest first."""
    folder = state_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    matches = (_CHECKPOINT_NAME.fullmatch(path.name) for path in folder.iterdir())
    return sorted(int(match.group(1)) for match in matches if match)


def save_checkpoint(state_dir: Path, round_index: int, params: Mapping[str, torch.Tensor],
                    meta: Mapping[str, object], keep: int) -> int:
    """Write the checkpoint after `round_index` rounds and keep the newest `keep`; returns the
    parameter bytes written."""
    from peerd.tensorfile import write_safetensors

    record_path, params_path = _paths(state_dir, round_index)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    size, sha256 = atomic_write(params_path, lambda handle: write_safetensors(handle, params))
    record = {**meta, "format": CHECKPOINT_FORMAT, "round": round_index,
              "params_file": params_path.name, "params_bytes": size, "params_sha256": sha256}
    record["checksum"] = _record_digest(record)
    atomic_write_bytes(record_path, json.dumps(record, indent=1, sort_keys=True).encode())
    _rotate(state_dir, keep)
    return size


def _rotate(state_dir: Path, keep: int) -> None:
    rounds = checkpoint_rounds(state_dir)
    for old in rounds[:-keep]:
        discard_checkpoint(state_dir, old)


def discard_checkpoint(state_dir: Path, round_index: int) -> None:
    record_path, params_path = _paths(state_dir, round_index)
    record_path.unlink(missing_ok=True)  # first: a record never names a missing file
    params_path.unlink(missing_ok=True)


def read_checkpoint(state_dir: Path, round_index: int,
                    shapes: Mapping[str, tuple[int, ...]]) -> Checkpoint:
    """The checkpoint after `round_index` rounds, checked end to end; CheckpointError says
    what is wrong with it."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    record_path, params_path = _paths(state_dir, round_index)
    try:
        record = json.loads(record_path.read_bytes())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"unreadable record: {error}") from None
    if not isinstance(record, dict) or record.get("checksum") != _record_digest(record):
        raise CheckpointError("the record's checksum does not match its content")
    if record.get("format") != CHECKPOINT_FORMAT or record.get("round") != round_index:
        raise CheckpointError(f"format {record.get('format')} round {record.get('round')}, "
                              f"expected format {CHECKPOINT_FORMAT} round {round_index}")
    try:
        data = params_path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"parameters unreadable: {error.strerror}") from None
    if len(data) != record["params_bytes"]:
        raise CheckpointError(f"{params_path.name} has {len(data)} bytes, the record says "
                              f"{record['params_bytes']} (truncated?)")
    if hashlib.sha256(data).hexdigest() != record["params_sha256"]:
        raise CheckpointError(f"{params_path.name}: SHA-256 differs from the record's")
    try:
        params = safetensors_load(data)
    except SafetensorError as error:
        raise CheckpointError(f"{params_path.name}: not valid safetensors: {error}") from None
    found = {name: tuple(tensor.shape) for name, tensor in params.items()}
    if found != dict(shapes):
        raise CheckpointError(f"{params_path.name}: tensors differ from the model's")
    for name, tensor in params.items():
        if tensor.dtype != torch.float32 or not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{params_path.name}: {name} is not finite float32")
    return Checkpoint(round_index, params, record, record_path)


def load_checkpoint(state_dir: Path, shapes: Mapping[str, tuple[int, ...]],
                    identity: Mapping[str, object], near_round: int | None = None
                    ) -> Checkpoint | None:
    """The newest sound checkpoint (or, given `near_round`, the one after exactly that many
    rounds, else the closest older, else the closest newer); None when there is none.

    Unusable ones are skipped with a warning; a sound one whose `identity` (task, model
    fingerprint, method, seed, peer id) differs raises CheckpointMismatch.
    """
    rounds = checkpoint_rounds(state_dir)
    if near_round is None:
        order = sorted(rounds, reverse=True)
    else:
        order = sorted(rounds, key=lambda r: (r > near_round, abs(r - near_round)))
    for round_index in order:
        try:
            checkpoint = read_checkpoint(state_dir, round_index, shapes)
        except CheckpointError as error:
            log.warning("checkpoint %s is unusable: %s; trying the previous one",
                        _paths(state_dir, round_index)[0], error)
            continue
        differing = [f"{key} {checkpoint.record.get(key)!r} (this daemon: {value!r})"
                     for key, value in identity.items() if checkpoint.record.get(key) != value]
        if differing:
            raise CheckpointMismatch(
                f"{checkpoint.path} belongs to another run: " + ", ".join(differing) +
                f"; give this daemon another --state-dir, or remove {checkpoint.path.parent} "
                "to start it from scratch")
        return checkpoint
    return None


def rewind(state_dir: Path, round_index: int) -> None:
    """Entering a run at `round_index`: later checkpoints and log records belong to rounds
    that will be run again (a cluster restarted from an earlier round), so they go."""
    for later in checkpoint_rounds(state_dir):
        if later > round_index:
            discard_checkpoint(state_dir, later)
    path = state_dir / ROUNDS_LOG
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _logged_round(line) <= round_index]
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _logged_round(line: str) -> float:
    """The round of a rounds.jsonl line; a line cut short by a crash counts as after all."""
    try:
        return json.loads(line)["round"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
