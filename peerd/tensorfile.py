"""Safetensors files written one tensor at a time.

`safetensors.torch.save` builds the whole file in memory: for a 100M-parameter model a second
full copy of the parameters at every checkpoint (invariant 9: a peer holds at most one). The
format is a little-endian u64 header length, a JSON header naming every tensor's dtype, shape
and byte range, padded with spaces to 8 bytes, then the raw little-endian bytes; this writer
lays it out exactly as safetensors does (tensors by alignment, then name), so the bytes are the
library's and `safetensors.torch.load` reads them back.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Mapping
from typing import BinaryIO

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
           torch.bool: "BOOL"}


def _raw(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if sys.byteorder != "little" and flat.element_size() > 1:
        raise ValueError("safetensors files are little-endian; this host is not")
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(handle: BinaryIO, tensors: Mapping[str, torch.Tensor]) -> tuple[int, str]:
    """Write `tensors` as a safetensors file to `handle`; returns (bytes written, SHA-256).
    Holds one tensor's contiguous copy at most (none for contiguous tensors)."""
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, dict] = {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors "
                             f"files of peerd do not carry")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    digest = hashlib.sha256()
    for part in (struct.pack("<Q", len(encoded)), encoded):
        handle.write(part)
        digest.update(part)
    for name in names:
        raw = _raw(tensors[name])
        handle.write(raw)
        digest.update(raw)
    return 8 + len(encoded) + offset, digest.hexdigest()
