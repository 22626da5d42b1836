"""What a daemon keeps on disk: its stable peer id and its latest parameters.

Writes are atomic (temp file, fsync, rename) so that a crash leaves either the old or the
new file, never half of one. Parameters are safetensors, metadata JSON: no pickle.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

# Peer ids and cluster names: safe in file names, mDNS instance names and log lines.
IDENTIFIER = re.compile(r"[A-Za-z0-9._-]{1,64}")


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    """`mode` (less the umask) applies from the file's creation: a private key written with
    0o600 is never readable by others, not even half-written."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


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
    atomic_write_bytes(state_dir / "params.safetensors", safetensors_bytes(
        {name: tensor.contiguous() for name, tensor in params.items()}))
    atomic_write_bytes(state_dir / "state.json", json.dumps(meta, indent=2).encode())
