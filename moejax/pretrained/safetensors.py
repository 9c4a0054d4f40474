"""Reading and writing safetensors files without torch: a JSON header, then raw little-endian
tensors (https://github.com/huggingface/safetensors, the format's description).

Each tensor is read on its own into a fresh array (positioned reads, no memory map), so a loader
that converts and places one tensor before reading the next holds about one tensor in host
memory however large the file; bfloat16 comes through `ml_dtypes` (a JAX dependency).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from moejax.errors import UserError

DTYPES: Mapping[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
# A header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER = 100_000_000


class SafetensorsFile:
    """The tensors of one `.safetensors` file by name, each read from disk when asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise UserError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (header_size,) = struct.unpack("<Q", raw)
            if header_size > MAX_HEADER:
                raise UserError(f"{self.path}: not a safetensors file (header of {header_size} B)")
            header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self.data_start = 8 + header_size

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self.entries[name]["dtype"]
        if code not in DTYPES:
            raise UserError(
                f"{self.path}: tensor {name!r} has dtype {code}, not one of {list(DTYPES)}"
            )
        return DTYPES[code]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor `name`, read into a new array."""
        begin, end = self.entries[name]["data_offsets"]
        array = np.empty(self.shape(name), self.dtype(name))
        if array.nbytes != end - begin:
            raise UserError(
                f"{self.path}: tensor {name!r} holds {end - begin} bytes; its shape and dtype "
                f"need {array.nbytes}"
            )
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
                raise UserError(f"{self.path}: truncated inside tensor {name!r}")
        return array


def save_file(tensors: Mapping[str, np.ndarray], path: str | Path, metadata: dict | None = None):
    """Writes `tensors` (name -> array) as one safetensors file, in name order."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in NAMES:
            raise ValueError(
                f"save_file: tensor {name!r} has dtype {array.dtype}; allowed: {list(NAMES)}"
            )
        header[name] = {
            "dtype": NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())


def iter_shards(names: Mapping[str, str]) -> Iterator[tuple[str, list[str]]]:
    """(shard file, its tensor names) in file order, from a name -> file index."""
    by_file: dict[str, list[str]] = {}
    for name, file in names.items():
        by_file.setdefault(file, []).append(name)
    yield from sorted(by_file.items())
