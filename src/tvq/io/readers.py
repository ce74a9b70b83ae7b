"""Lazy checkpoint readers: one tensor at a time, never the whole model set in RAM.

Supported inputs: a ``.safetensors`` file, a Hugging Face folder (single or sharded
safetensors, or ``pytorch_model.bin`` [sharded]), and torch ``.pt``/``.bin`` state dicts.
Torch files are opened with ``weights_only=True`` (and ``mmap=True`` for the zip format, so
tensors stay on disk until used); what that refuses (a whole pickled module, the paper's
``zeroshot.pt`` / ``<Task>/finetuned.pt``) is read by the restricted reader, which runs none of
the file's code (:mod:`tvq.io.torch_pickle_reader`); a full pickle is only allowed with
``unsafe_pickle=True``, for files that even that cannot read.
Model folders come from downloads: every file is checked to be a regular file before it is
opened, headers and indexes are bounded, and shard names stay inside their folder.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tvq.errors import CheckpointError, where
from tvq.io.checkpoint_base import ANSI as _ANSI
from tvq.io.checkpoint_base import MAX_TENSOR_NAME as MAX_TENSOR_NAME
from tvq.io.checkpoint_base import CheckpointReader as CheckpointReader
from tvq.io.checkpoint_base import ReaderBase as _ReaderBase
from tvq.io.checkpoint_base import TensorMeta as TensorMeta
from tvq.io.checkpoint_base import check_tensor_name as _check_tensor_name
from tvq.io.checkpoint_base import one_line as _one_line
from tvq.io.checkpoint_base import refuse_pseudo_file as _refuse_pseudo_file
from tvq.io.checkpoint_base import regular_file as _regular_file
from tvq.io.checkpoint_base import wrapped_model
from tvq.io.dtypes import SAFETENSORS_DTYPES
from tvq.io.hub import resolve_model
from tvq.io.layouts import official_file
from tvq.io.paths import confined, name_problem
from tvq.io.torch_archive import is_torch_zip
from tvq.io.torch_pickle_reader import TorchPickleReader

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the header length word
MAX_INDEX_BYTES = 64 << 20  # a shard index of a 1T-parameter model is a few MB
# Where training scripts nest a state dict: torch.save({"model": sd, "epoch": 3, ...}).


MAP_MIN_BYTES = 1 << 20  # tensors this big are mapped, smaller ones read


class SafetensorsFile:
    """Reads tensors of one safetensors file, each into a buffer of its own.

    safetensors' own ``get_tensor`` hands out views of one map of the whole file: every
    page a run touches stays mapped and counts in its RSS (11 GB for a 1B model and 4
    fine-tunes). Here a large tensor gets a private copy-on-write map of just its own
    pages (zero-copy from the page cache, 3x faster than reading into fresh memory, which
    the kernel must zero first; writes stay private), unmapped when the tensor is freed;
    small ones are read with ``pread``. The header (8-byte little-endian length, then
    JSON) is read here once, its length bounded, and validated by the safetensors library."""

    def __init__(self, path: Path) -> None:
        self.path = path
        header, data_start = _read_header(path, _regular_file(path))
        try:
            with safe_open(str(path), framework="pt") as handle:
                self.metas = {}
                for key in handle.keys():  # noqa: SIM118 -- a safetensors handle, not a dict
                    _check_tensor_name(path, key)
                    sl = handle.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{where(path, key)}: unsupported dtype {sl.get_dtype()}")
                    self.metas[key] = TensorMeta(tuple(sl.get_shape()), dtype)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{where(path)}: not a readable safetensors file ({_one_line(str(exc))})") from None
        self._offsets = {key: _data_range(path, key, header, data_start, meta) for key, meta in self.metas.items()}
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
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # ndarray is a buffer
            done = 0
            while done < nbytes:
                got = os.preadv(self._fd, [view[done:]], start + done)
                if got <= 0:
                    raise CheckpointError(f"{where(self.path, key)}: file ends inside the tensor")
                done += got
        return out

    def read_bytes(self, key: str, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes ``[offset, offset + nbytes)`` of one tensor's data, flat uint8, in a fresh buffer
        (a block of a large tensor: the rest is never read)."""
        start, total = self._offsets[key]
        if offset < 0 or nbytes < 0 or offset + nbytes > total:
            raise CheckpointError(f"{where(self.path, key)}: bytes [{offset}, {offset + nbytes}) outside its {total} bytes")
        out = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(out.numpy())  # type: ignore[arg-type]  # ndarray is a buffer
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], start + offset + done)
            if got <= 0:
                raise CheckpointError(f"{where(self.path, key)}: file ends inside the tensor")
            done += got
        return out

    def get_elements(self, key: str, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened tensor, in its stored dtype."""
        dtype = self.metas[key].dtype
        size = dtype.itemsize
        return self.read_bytes(key, start * size, (end - start) * size).view(dtype)

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


def _read_header(path: Path, size: int) -> tuple[dict[str, object], int]:
    """The JSON header and where the data starts; a header length past the format's 100 MB
    is refused before anything is allocated for it."""
    bad = f"{where(path)}: not a readable safetensors file"
    if size < 8:
        raise CheckpointError(f"{bad} (only {size} bytes)")
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{bad} (header of {n} bytes, more than the {MAX_HEADER_BYTES} the format allows)")
            if n > size - 8:
                raise CheckpointError(f"{bad} (header of {n} bytes runs past the end of the {size}-byte file)")
            raw = fh.read(n)
        header = json.loads(raw)
    except CheckpointError:
        raise
    except (OSError, ValueError, RecursionError, struct.error) as exc:
        raise CheckpointError(f"{bad} (header: {_one_line(str(exc)) or type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (header is a JSON {type(header).__name__}, not an object)")
    return header, 8 + n


def _data_range(path: Path, key: str, header: dict[str, object], data_start: int, meta: TensorMeta) -> tuple[int, int]:
    """(file offset, byte count) of a tensor's data, checked against its shape and dtype."""
    entry = header.get(key)
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where(path, key)}: header has no valid data_offsets (the file changed while being read?)")
    nbytes = offsets[1] - offsets[0]
    if nbytes != meta.numel * meta.dtype.itemsize:
        raise CheckpointError(f"{where(path, key)}: {nbytes} bytes of data for shape {list(meta.shape)} of {meta.dtype}")
    return data_start + offsets[0], nbytes


class SafetensorsReader(_ReaderBase):
    """One or several safetensors files (shards), read lazily, one tensor at a time."""

    def __init__(self, path: Path, shards: dict[str, Path] | None = None) -> None:
        self.path = path
        files = sorted(set(shards.values())) if shards else [path]
        self._handles: dict[Path, SafetensorsFile] = {}
        self._file_of: dict[str, Path] = {}
        self._stored: dict[str, str] = {}  # a shared name -> the name its file stores it under
        self._metas = {}
        for file in files:
            if not file.exists():
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
            return self._handles[file].get_tensor(self._stored.get(key, key))
        except Exception as exc:
            raise CheckpointError(f"{where(file, key)}: cannot read tensor ({exc})") from None

    def get_elements(self, key: str, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened tensor (stored dtype): only those bytes are read."""
        file = self._file_of.get(key)
        if file is None:
            raise CheckpointError(f"{where(self.path, key)}: no such tensor in this checkpoint")
        return self._handles[file].get_elements(self._stored.get(key, key), start, end)

    def share(self, alias: str, name: str) -> None:
        super().share(alias, name)
        self._file_of[alias] = self._file_of[name]
        self._stored[alias] = self._stored.get(name, name)

    def hide(self, key: str) -> None:
        super().hide(key)
        del self._file_of[key]


class MemoryReader(_ReaderBase):
    """A state dict in memory behind the reader interface (tests, notebooks)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> None:
        self.path = Path(path)
        self._tensors = dict(tensors)
        self._metas = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{where(self.path, key)}: no such tensor in this checkpoint") from None

    def get_elements(self, key: str, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened tensor (a view: it is in memory already)."""
        return self.get(key).reshape(-1)[start:end]

    def share(self, alias: str, name: str) -> None:
        super().share(alias, name)
        self._tensors[alias] = self._tensors[name]

    def hide(self, key: str) -> None:
        super().hide(key)
        del self._tensors[key]


def element_reader(reader: CheckpointReader) -> SafetensorsReader | MemoryReader | None:
    """``reader`` when it reads a block of a tensor's elements (``get_elements``), else None."""
    return reader if isinstance(reader, (SafetensorsReader, MemoryReader)) else None


class StateDictReader(MemoryReader):
    """Torch pickles (``.pt``/``.bin``), optionally sharded via a ``.bin.index.json``: loaded
    (memory-mapped where torch can) into a state dict, then read like one."""

    def __init__(self, path: Path, files: list[Path], unsafe_pickle: bool = False, tensors: dict[str, torch.Tensor] | None = None) -> None:
        if tensors is None:
            tensors = {}
            for file in files:
                try:
                    tensors.update(_torch_load(file, unsafe_pickle=False))
                except NeedsCode:
                    inert = _without_code(file, unsafe_pickle)
                    if inert is None:
                        tensors.update(_torch_load(file, unsafe_pickle=True))
                    else:  # a shard of a sharded folder: read whole, as weights_only would
                        tensors.update({k: inert.get(k) for k in inert})
        super().__init__(tensors, path)


class NeedsCode(CheckpointError):
    """weights_only refused the file for a class it does not know: the restricted reader
    (:mod:`tvq.io.torch_pickle_reader`) is tried next, a full pickle only with --unsafe-pickle."""


def _without_code(file: Path, unsafe_pickle: bool) -> TorchPickleReader | None:
    """The file read inertly (no code runs); None when that fails and ``unsafe_pickle`` allows
    a full pickle; otherwise the reason, in one line, with the advice."""
    try:
        return TorchPickleReader(file)
    except CheckpointError as exc:
        if "not even with --unsafe-pickle" in str(exc):
            raise
        if unsafe_pickle:
            return None
        reason = str(exc).removeprefix(f"{file}: ")
        raise CheckpointError(
            f"{where(file)}: cannot be read without running its code ({reason}); if you trust this file, pass --unsafe-pickle"
        ) from None


def _open_torch_file(file: Path, unsafe_pickle: bool) -> StateDictReader | TorchPickleReader:
    """One torch file: a state dict through weights_only (memory-mapped), a pickled module
    (or anything weights_only refuses) through the restricted reader, lazily, without its
    classes; a full pickle only when that fails too and ``unsafe_pickle`` allows it."""
    try:
        tensors = _torch_load(file, unsafe_pickle=False)
    except NeedsCode:
        inert = _without_code(file, unsafe_pickle)
        if inert is not None:
            return inert
        tensors = _torch_load(file, unsafe_pickle=True)
    return StateDictReader(file, [file], tensors=tensors)


def _is_zip(file: Path) -> bool:
    """Whether a torch file is in the zip format (torch >= 1.6), which torch can map; the
    legacy format (``_use_new_zipfile_serialization=False``) must be read."""
    return is_torch_zip(file)


def _torch_load(file: Path, unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of a torch file, loaded with ``weights_only=True``; a full pickle (which can
    run any code) only with ``unsafe_pickle``, and only when weights_only refused the file."""
    _regular_file(file)
    zipped = _is_zip(file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:
        text = _ANSI.sub("", str(exc))
        blocked = re.search(r"GLOBAL (\S+) whose module (\S+) is blocked", text)
        if blocked:  # os.system and friends: a model file has no use for them
            raise CheckpointError(
                f"{where(file)}: refers to {blocked[1]} from the blocked module {blocked[2]}; not loaded, not even with --unsafe-pickle"
            ) from None
        if not (unsafe_pickle and isinstance(exc, pickle.UnpicklingError)):
            wanted = re.search(r"GLOBAL (\S+) was not an allowed global", text)
            if wanted:
                raise NeedsCode(
                    f"{where(file)}: cannot be loaded with weights_only=True: it refers to {wanted[1]}, "
                    "which is not an allowed global; if you trust this file, pass --unsafe-pickle"
                ) from None
            raise CheckpointError(f"{where(file)}: not a readable torch file ({_torch_reason(text, exc)})") from None
        warnings.warn(f"{file}: loading a full pickle (--unsafe-pickle); this can run arbitrary code", stacklevel=2)
        try:
            obj = torch.load(file, map_location="cpu", weights_only=False, mmap=zipped)
        except Exception as exc2:
            raise CheckpointError(f"{where(file)}: not a readable torch file ({_torch_reason(str(exc2), exc2)})") from None
    return _state_dict_of(obj, file)


def _torch_reason(text: str, exc: Exception) -> str:
    """The line of torch's message that says what went wrong, without its advice around it."""
    text = _ANSI.sub("", text).split("Check the documentation of torch.load")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = _one_line(lines[-1].split("WeightsUnpickler error:")[-1].split(". ")[0]) if lines else ""
    if isinstance(exc, (RuntimeError, pickle.UnpicklingError)) and last:
        return last
    return f"{type(exc).__name__}: {last}" if last else type(exc).__name__


def _tensors_of(state: Mapping[Any, object]) -> dict[str, torch.Tensor]:
    """The tensor entries of a state dict; other values (step counters, configs) are skipped."""
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _state_dict_of(obj: object, file: Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded torch object: the object itself, one nested under a training
    checkpoint's usual key (``{"model": sd, "epoch": 3}``), or a whole module's (full pickles)."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where(file)}: holds a {type(obj).__name__}, not a state dict")
    tensors = _tensors_of(obj)
    if not tensors:
        inner = wrapped_model(obj, file, lambda v: isinstance(v, torch.nn.Module) or (isinstance(v, Mapping) and bool(_tensors_of(v))))
        tensors = _tensors_of(inner.state_dict() if isinstance(inner, torch.nn.Module) else inner)
    for key in tensors:
        _check_tensor_name(file, key)
    return tensors


def _shard_path(index_file: Path, name: object) -> Path:
    """The shard file a shard index names, confined to the index's folder. The one exception:
    a Hugging Face cache snapshot, whose files are symlinks into the cache's own ``blobs``."""
    folder = index_file.parent
    try:
        return confined(folder, name, index_file, error=CheckpointError)
    except CheckpointError:
        snapshot = folder.resolve()
        if name_problem(name) is not None or snapshot.parent.name != "snapshots":
            raise
        path = folder / str(name)
        if path.resolve().parent != snapshot.parent.parent / "blobs":
            raise
        return path


def _index_shards(index_file: Path) -> dict[str, Path]:
    """Tensor name -> shard file of a shard index: a stranger's file, so its size, its shape
    and every name in it are checked before any shard is opened."""
    size = _regular_file(index_file)
    bad = f"{where(index_file)}: not a valid shard index"
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{bad} ({size} bytes, at most {MAX_INDEX_BYTES})")
    try:
        with open(index_file, "rb") as fh:
            data = json.loads(fh.read(MAX_INDEX_BYTES + 1))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{bad} ({_one_line(str(exc)) or type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{bad} (a JSON {type(data).__name__}, expected an object with a 'weight_map')")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        got = "an empty object" if weight_map == {} else f"a JSON {type(weight_map).__name__}" if "weight_map" in data else "nothing"
        raise CheckpointError(f"{bad} ('weight_map' must map tensor names to shard files, got {got})")
    files: dict[str, Path] = {}
    shards: dict[str, Path] = {}
    for key, name in weight_map.items():
        _check_tensor_name(index_file, key)
        if not isinstance(name, str):
            raise CheckpointError(f"{where(index_file, key)}: shard file name must be a string, got {type(name).__name__}")
        if name not in files:
            files[name] = _shard_path(index_file, name)
        shards[key] = files[name]
    return shards


def open_checkpoint(path: str | Path, unsafe_pickle: bool = False) -> SafetensorsReader | StateDictReader | TorchPickleReader:
    """Open any supported checkpoint lazily; safetensors is preferred when a folder has both.
    ``path`` may be a hub id ``org/name[@revision]`` (``tvq.io.hub``; a local path wins)."""
    p = resolve_model(path)
    _refuse_pseudo_file(p)
    if not p.exists():
        raise CheckpointError(f"{where(p)}: file not found")
    if p.is_dir():
        return _open_folder(p, unsafe_pickle)
    _regular_file(p)
    if p.name.endswith(".safetensors.index.json"):
        return SafetensorsReader(p, _index_shards(p))
    if p.suffix == ".safetensors":
        return SafetensorsReader(p)
    if p.name.endswith(".bin.index.json"):
        return StateDictReader(p, sorted(set(_index_shards(p).values())), unsafe_pickle)
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _open_torch_file(p, unsafe_pickle)
    # Unknown suffix: sniff the safetensors header, otherwise try torch.
    try:
        return SafetensorsReader(p)
    except CheckpointError:
        return _open_torch_file(p, unsafe_pickle)


def _open_folder(p: Path, unsafe_pickle: bool) -> SafetensorsReader | StateDictReader | TorchPickleReader:
    """A Hugging Face style folder. Entries are tested with ``exists`` rather than ``is_file``
    so a FIFO or folder where a checkpoint should be is reported, not silently skipped."""
    if (p / "model.safetensors.index.json").exists():
        return SafetensorsReader(p, _index_shards(p / "model.safetensors.index.json"))
    if (p / "model.safetensors").exists():
        return SafetensorsReader(p / "model.safetensors")
    singles = sorted(p.glob("*.safetensors"))
    if len(singles) == 1:
        return SafetensorsReader(singles[0])
    if len(singles) > 1:  # which one is the model is a guess tvq does not make
        names = ", ".join(f.name for f in singles[:2]) + (", ..." if len(singles) > 2 else "")
        raise CheckpointError(
            f"{where(p)}: folder holds {len(singles)} safetensors files and no index ({names}): "
            "name one file or add model.safetensors.index.json"
        )
    if (p / "pytorch_model.bin.index.json").exists():
        shards = sorted(set(_index_shards(p / "pytorch_model.bin.index.json").values()))
        return StateDictReader(p, shards, unsafe_pickle)
    for name in ("pytorch_model.bin", "model.pt", "model.bin"):
        if (p / name).exists():
            return StateDictReader(p, [p / name], unsafe_pickle)
    official = official_file(p)  # the paper's layout: <Task>/finetuned.pt, <model>/zeroshot.pt
    if official is not None:
        return _open_torch_file(official, unsafe_pickle)
    raise CheckpointError(f"{where(p)}: folder holds no model.safetensors, shard index, pytorch_model.bin, finetuned.pt or zeroshot.pt")


def float_keys(reader: CheckpointReader) -> list[str]:
    """The names of the reader's floating-point tensors (the ones task vectors have), in its order."""
    names = reader.keys()
    return [k for k in names if reader.meta(k).is_float]


def as_reader(
    source: str | os.PathLike[str] | CheckpointReader | Mapping[str, torch.Tensor], unsafe_pickle: bool = False
) -> CheckpointReader:
    """A reader for a checkpoint path (opened lazily), a state dict (held as it is), or the reader itself."""
    if isinstance(source, (str, os.PathLike)):
        return open_checkpoint(Path(source), unsafe_pickle)
    if isinstance(source, Mapping):
        return MemoryReader(source)
    return source
