"""A streaming safetensors writer: tensors are appended one at a time, never all in RAM.

The safetensors library can only save a complete dict. Packs and merged models are
written tensor by tensor, so we reserve room for the JSON header up front (sized for the
worst case), append data, and fill the header in at the end. The result is a standard
safetensors file (the header is padded with spaces, which the format allows).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from tvq.io.dtypes import DTYPE_NAMES


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    data = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(data).cast("B") if t.numel() else memoryview(b"")  # type: ignore[arg-type]  # ndarray is a buffer


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


class StreamingSafetensorsWriter:
    """Append tensors to ``path`` (already a temporary path: atomicity is the caller's job)."""

    def __init__(self, path: Path, names: list[str], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self._metadata = dict(metadata or {})
        self._allowed = set(names)
        self._entries: dict[str, dict] = {}
        self._offset = 0
        # Room for the header: each entry's name plus what its dtype/shape/offsets usually take;
        # close() rewrites the file in the rare case this is not enough (e.g. 5-D shapes).
        self._reserved = 256 + sum(len(json.dumps(n)) + 120 for n in names) + len(json.dumps(self._metadata))
        self._reserved += (-self._reserved) % 8
        self._fh = open(path, "wb")  # noqa: SIM115 -- held across add() calls, closed by close()/abort()
        self._fh.write(b"\0" * (8 + self._reserved))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (hashing its bytes, where wanted, is the caller's business)."""
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name!r}")
        if name not in self._allowed:
            raise ValueError(f"tensor {name!r} was not announced to the writer")
        data = tensor_bytes(tensor)
        nbytes = data.nbytes
        self._entries[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._fh.write(data)
        self._offset += nbytes

    def add_chunks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | list[int], chunks: Iterable[torch.Tensor]) -> None:
        """Append one tensor given as consecutive flat pieces of ``dtype`` (a large tensor merged
        a block at a time: never whole in memory); they must add up to ``shape``."""
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name!r}")
        if name not in self._allowed:
            raise ValueError(f"tensor {name!r} was not announced to the writer")
        start = self._offset
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise ValueError(f"tensor {name!r}: a piece of {chunk.dtype}, expected {dtype}")
            data = tensor_bytes(chunk)
            self._fh.write(data)
            self._offset += data.nbytes
        expected = math.prod(shape) * (1 if dtype == torch.bool else dtype.itemsize)
        if self._offset - start != expected:
            raise ValueError(f"tensor {name!r}: pieces of {self._offset - start} bytes, expected {expected}")
        self._entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [start, self._offset]}

    def close(self) -> int:
        """Write the header into its reserved room; returns the file size in bytes."""
        header = dict(self._entries)
        if self._metadata:
            header["__metadata__"] = self._metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > self._reserved:
            return self._close_with_larger_header(raw)
        raw += b" " * (self._reserved - len(raw))
        self._fh.seek(0)
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._fh.flush()
        self._fh.close()
        return 8 + len(raw) + self._offset

    def _close_with_larger_header(self, raw: bytes) -> int:
        """Move the data behind a header that did not fit the reserved room."""
        raw += b" " * (-len(raw) % 8)
        self._fh.close()
        moved = self.path.with_name(self.path.name + ".grow")
        with open(self.path, "rb") as src, open(moved, "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)))
            dst.write(raw)
            src.seek(8 + self._reserved)
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(moved, self.path)
        return 8 + len(raw) + self._offset

    def abort(self) -> None:
        self._fh.close()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
