"""Lazy checkpoint readers: one tensor at a time, never the whole model set in RAM.

Supported inputs: a ``.safetensors`` file, a Hugging Face folder (single or sharded
safetensors, or ``pytorch_model.bin`` [sharded]), and torch ``.pt``/``.bin`` state dicts.
Torch files are opened with ``weights_only=True`` (and ``mmap=True`` so tensors stay on
disk until used); a full pickle is only allowed with ``unsafe_pickle=True``.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from tvq.errors import CheckpointError, where

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class CheckpointReader(Protocol):
    """What every reader offers: key listing, metadata, and one-tensor reads."""

    path: Path

    def keys(self) -> list[str]: ...

    def meta(self, key: str) -> TensorMeta: ...

    def get(self, key: str) -> torch.Tensor: ...


class _ReaderBase:
    path: Path

    def __contains__(self, key: str) -> bool:
        return key in self._metas

    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, key: str) -> TensorMeta:
        try:
            return self._metas[key]
        except KeyError:
            raise CheckpointError(f"{where(self.path, key)}: no such tensor in this checkpoint") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._metas)

    def float_bytes(self, bytes_per_element: int = 4) -> int:
        """Size of the floating-point tensors at a given precision (FP32 by default)."""
        return sum(m.numel * bytes_per_element for m in self._metas.values() if m.is_float)

    _metas: dict[str, TensorMeta]


MAP_MIN_BYTES = 1 << 20  # tensors this big are mapped, smaller ones read


class SafetensorsFile:
    """Reads tensors of one safetensors file, each into a buffer of its own.

    safetensors' own ``get_tensor`` hands out views of one map of the whole file: every
    page a run touches stays mapped and counts in its RSS (11 GB for a 1B model and 4
    fine-tunes). Here a large tensor gets a private copy-on-write map of just its own
    pages (zero-copy from the page cache, 3x faster than reading into fresh memory, which
    the kernel must zero first; writes stay private), unmapped when the tensor is freed;
    small ones are read with ``pread``. The header (8-byte little-endian length, then
    JSON) is validated by the safetensors library on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with safe_open(str(path), framework="pt") as handle:
                self.metas = {}
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{where(path, key)}: unsupported dtype {sl.get_dtype()}")
                    self.metas[key] = TensorMeta(tuple(sl.get_shape()), dtype)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{where(path)}: not a readable safetensors file ({exc})") from None
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        self._offsets = {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}
        self._fd = os.open(path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self.metas)

    def get_tensor(self, key: str) -> torch.Tensor:
        """A tensor of its own holding the stored bytes (thread-safe: maps and positional reads)."""
        meta = self.metas[key]
        start, nbytes = self._offsets[key]
        if nbytes >= MAP_MIN_BYTES:
            return self._mapped(key, start, nbytes).view(meta.dtype).reshape(meta.shape)
        out = torch.empty(meta.shape, dtype=meta.dtype)
        if nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < nbytes:
                got = os.preadv(self._fd, [view[done:]], start + done)
                if got <= 0:
                    raise CheckpointError(f"{where(self.path, key)}: file ends inside the tensor")
                done += got
        return out

    def _mapped(self, key: str, start: int, nbytes: int) -> torch.Tensor:
        """The tensor's bytes as a private map (writes never reach the file)."""
        if os.fstat(self._fd).st_size < start + nbytes:  # a map past the end would SIGBUS on access
            raise CheckpointError(f"{where(self.path, key)}: file ends inside the tensor")
        lead = start % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(self._fd, nbytes + lead, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start - lead)
        return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=lead)  # keeps the map alive

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class SafetensorsReader(_ReaderBase):
    """One or several safetensors files (shards), read lazily, one tensor at a time."""

    def __init__(self, path: Path, shards: dict[str, Path] | None = None) -> None:
        self.path = path
        files = sorted(set(shards.values())) if shards else [path]
        self._handles: dict[Path, SafetensorsFile] = {}
        self._file_of: dict[str, Path] = {}
        self._metas = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{where(file)}: shard listed in the index is missing")
            handle = SafetensorsFile(file)
            self._handles[file] = handle
            self._metas.update(handle.metas)
            self._file_of.update(dict.fromkeys(handle.metas, file))
        if shards:
            missing = set(shards) - set(self._metas)
            if missing:
                key = sorted(missing)[0]
                raise CheckpointError(f"{where(shards[key], key)}: listed in the index but absent from the shard")

    def get(self, key: str) -> torch.Tensor:
        """The tensor, in a fresh buffer of its own."""
        file = self._file_of.get(key)
        if file is None:
            raise CheckpointError(f"{where(self.path, key)}: no such tensor in this checkpoint")
        try:
            return self._handles[file].get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{where(file, key)}: cannot read tensor ({exc})") from None


class StateDictReader(_ReaderBase):
    """Torch pickles (``.pt``/``.bin``), optionally sharded via a ``.bin.index.json``."""

    def __init__(self, path: Path, files: list[Path], unsafe_pickle: bool = False) -> None:
        self.path = path
        self._tensors: dict[str, torch.Tensor] = {}
        for file in files:
            state = _torch_load(file, unsafe_pickle)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    self._tensors[key] = value
        self._metas = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{where(self.path, key)}: no such tensor in this checkpoint") from None


def _torch_load(file: Path, unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    """Load a torch file safely; unwrap ``{"state_dict": ...}`` and whole modules."""
    if not file.is_file():
        raise CheckpointError(f"{where(file)}: file not found")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        if not unsafe_pickle:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{where(file)}: cannot be loaded with weights_only=True ({first[:200]}); "
                "if you trust this file, pass --unsafe-pickle"
            ) from None
        warnings.warn(f"{file}: loading a full pickle (--unsafe-pickle); this can run arbitrary code", stacklevel=2)
        try:
            obj = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise CheckpointError(f"{where(file)}: cannot be loaded ({exc2})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where(file)}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _index_shards(index_file: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where(index_file)}: not a valid shard index ({exc})") from None
    return {key: index_file.parent / name for key, name in weight_map.items()}


def open_checkpoint(path: str | Path, unsafe_pickle: bool = False) -> SafetensorsReader | StateDictReader:
    """Open any supported checkpoint lazily; safetensors is preferred when a folder has both."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{where(p)}: file not found")
    if p.is_dir():
        for index_name in ("model.safetensors.index.json",):
            if (p / index_name).is_file():
                return SafetensorsReader(p, _index_shards(p / index_name))
        if (p / "model.safetensors").is_file():
            return SafetensorsReader(p / "model.safetensors")
        singles = sorted(p.glob("*.safetensors"))
        if len(singles) == 1:
            return SafetensorsReader(singles[0])
        if (p / "pytorch_model.bin.index.json").is_file():
            shards = sorted(set(_index_shards(p / "pytorch_model.bin.index.json").values()))
            return StateDictReader(p, shards, unsafe_pickle)
        for name in ("pytorch_model.bin", "model.pt", "model.bin"):
            if (p / name).is_file():
                return StateDictReader(p, [p / name], unsafe_pickle)
        raise CheckpointError(f"{where(p)}: folder holds no model.safetensors, shard index or pytorch_model.bin")
    if p.name.endswith(".safetensors.index.json"):
        return SafetensorsReader(p, _index_shards(p))
    if p.suffix == ".safetensors":
        return SafetensorsReader(p)
    if p.name.endswith(".bin.index.json"):
        return StateDictReader(p, sorted(set(_index_shards(p).values())), unsafe_pickle)
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return StateDictReader(p, [p], unsafe_pickle)
    # Unknown suffix: sniff the safetensors header, otherwise try torch.
    try:
        return SafetensorsReader(p)
    except CheckpointError:
        return StateDictReader(p, [p], unsafe_pickle)
