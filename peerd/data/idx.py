"""Reader and writer for the IDX format used by MNIST and Fashion-MNIST.

An IDX file is: two zero bytes, one dtype code byte, one byte with the number of
dimensions, then one big-endian uint32 per dimension, then the data in C order
(big-endian for multi-byte types). Files ending in ``.gz`` are gzip-compressed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

# IDX dtype codes; multi-byte types are big-endian on disk.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES: dict[np.dtype, int] = {dtype: code for code, dtype in _DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            return gzip.decompress(path.read_bytes())
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a valid gzip file ({exc})") from exc
    return path.read_bytes()


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally ``.gz``) into an array in native byte order."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number must start with two zero bytes)")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(
            f"{path}: truncated header: {ndim} dimensions need {header_size} bytes, "
            f"file has {len(data)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _DTYPES[code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: size mismatch: header says shape {shape} of {dtype.name}, so the "
            f"(decompressed) file should be {expected} bytes, but it is {len(data)} bytes; "
            "the file is truncated or corrupt, download it again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    # frombuffer gives a read-only view of big-endian bytes; return a normal native array.
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in _CODES:
        raise ValueError(
            f"cannot write dtype {array.dtype} as IDX; use uint8, int8, int16, int32, "
            "float32 or float64"
        )
    header = bytes([0, 0, _CODES[dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
