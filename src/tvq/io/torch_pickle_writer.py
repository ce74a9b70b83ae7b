"""Writing a model back in the torch format it came in: the input file with new tensor bytes.

A torch file keeps the pickle program (``data.pkl``: classes, attributes, where each tensor
lies) apart from the tensors' storages (``data/<key>``). A merged or exported model has the
same tensors, shapes and dtypes as its pretrained input, so it is written as a copy of that
file in which only the storages' bytes change: each tensor's bytes are written where the
program says it lies (its storage, offset and strides), and each changed zip entry's CRC-32
(central directory and data descriptor) is updated. Every other byte (the program, the
version records, the zip directory, tensors that are not in the state dict) stays as it was,
so the official code's ``torch.load(path)`` loads tvq's output as it loaded the input, with
the original classes (which tvq itself never imports).

Tensors that share a storage are written in turn; each is read back at the end, and one
that another overwrote (overlapping views with different values) is an error, not a
silently different model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch

from tvq.errors import CheckpointError, ConfigError, where
from tvq.io.checkpoint_base import CheckpointReader
from tvq.io.torch_archive import TorchArchive, read_into
from tvq.io.torch_pickle import TensorRef
from tvq.io.torch_pickle_reader import TorchPickleReader, element_range, is_dense, read_tensor

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CRC_CHUNK = 16 << 20


def pickle_template(pretrained: CheckpointReader | object, out: str | Path) -> Path | None:
    """The torch file an output at ``out`` is written like: the pretrained model's own file,
    when ``out`` has a torch suffix (.pt, .pth, .bin, .ckpt) and the model was read from one
    torch file (a pickled module or a state dict); None otherwise."""
    if Path(out).suffix not in TORCH_SUFFIXES:
        return None
    path = getattr(pretrained, "path", None)
    if not isinstance(path, Path) or not path.is_file() or path.suffix in (".safetensors", ".json"):
        return None
    if isinstance(pretrained, TorchPickleReader):
        return path
    with open(path, "rb") as fh:
        head = fh.read(4)
    return path if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" else None


def write_like(template: Path, tensors: Iterable[tuple[str, torch.Tensor]], tmp: Path, dtype: torch.dtype | None = None) -> int:
    """Write ``tensors`` (every tensor of the template's state dict, any order) into a copy of
    ``template`` at ``tmp``; returns the file's size. ``dtype`` (a requested output dtype)
    must be every float tensor's own: the program fixes each storage's type."""
    source = TorchPickleReader(template)
    refs = source.refs
    if dtype is not None:
        other = next((k for k, r in refs.items() if r.dtype.is_floating_point and r.dtype != dtype), None)
        if other is not None:
            raise ConfigError(
                f"--dtype {str(dtype).removeprefix('torch.')}: a torch file written like {template.name} keeps its dtypes "
                f"({other!r} is {str(refs[other].dtype).removeprefix('torch.')}); drop --dtype or write .safetensors"
            )
    sharing = _shared_storages(refs)
    shutil.copyfile(template, tmp)
    written: dict[str, str] = {}  # key -> digest of the bytes written, for tensors sharing a storage
    with open(tmp, "r+b") as fh:
        fd = fh.fileno()
        for key, tensor in tensors:
            ref = refs.get(key)
            if ref is None:
                raise CheckpointError(f"{where(template, key)}: the output has this tensor, the file it is written like does not")
            if tuple(tensor.shape) != ref.shape or tensor.dtype != ref.dtype:
                got = f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
                held = f"{list(ref.shape)} {str(ref.dtype).removeprefix('torch.')}"
                raise CheckpointError(f"{where(template, key)}: output tensor of {got}, the file holds {held}")
            if key in written:
                raise CheckpointError(f"{where(template, key)}: written twice")
            _write_tensor(source.archive, fd, ref, tensor)
            written[key] = _digest(tensor) if ref.storage.key in sharing else ""
        missing = [k for k in refs if k not in written]
        if missing:
            raise CheckpointError(f"{where(template, missing[0])}: not in the output ({len(missing)} tensors missing)")
        for key in (k for k in refs if refs[k].storage.key in sharing):
            if _digest(read_tensor(source.archive, fd, refs[key], key)) != written[key]:
                raise CheckpointError(f"{where(template, key)}: shares its storage with another tensor that overwrote it with other values")
        if source.archive.kind == "zip":
            _update_crcs(source.archive, fd, {r.storage.key for r in refs.values()})
        os.fsync(fd)
    return os.path.getsize(tmp)


def _shared_storages(refs: dict[str, TensorRef]) -> set[str]:
    seen: set[str] = set()
    shared: set[str] = set()
    for ref in refs.values():
        (shared if ref.storage.key in seen else seen).add(ref.storage.key)
    return shared


def _digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().contiguous().reshape(-1)
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).hexdigest() if flat.numel() else ""  # type: ignore[arg-type]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _write_tensor(archive: TorchArchive, fd: int, ref: TensorRef, tensor: torch.Tensor) -> None:
    """The tensor's values where ``ref`` says they lie: one write when dense, else a
    read-modify-write of the range of the storage the view spans."""
    first, count = element_range(ref)
    if not count:
        return
    span = archive.span(ref.storage)
    itemsize = ref.dtype.itemsize
    values = tensor.detach().to("cpu").contiguous()
    if is_dense(ref):
        block = values.reshape(-1)
    else:
        block = torch.empty(count, dtype=ref.dtype)
        read_into(archive.path, fd, span, first * itemsize, memoryview(block.view(torch.uint8).numpy()).cast("B"))  # type: ignore[arg-type]
        block.as_strided(ref.shape, ref.stride).copy_(values)
    _pwrite_all(fd, memoryview(block.view(torch.uint8).numpy()).cast("B"), span.offset + first * itemsize)  # type: ignore[arg-type]


def _update_crcs(archive: TorchArchive, fd: int, keys: set[str]) -> None:
    """Recompute the CRC-32 of each storage entry written, where the zip records it."""
    for key in sorted(keys):
        span = archive.span_of(key)
        crc = 0
        done = 0
        while done < span.nbytes:
            chunk = os.pread(fd, min(CRC_CHUNK, span.nbytes - done), span.offset + done)
            if not chunk:
                raise CheckpointError(f"{where(archive.path)}: storage {key!r} ends early in the copy")
            crc = zlib.crc32(chunk, crc)
            done += len(chunk)
        packed = struct.pack("<I", crc)
        fields = archive.crcs[key]
        for offset in (fields.central, fields.descriptor, fields.local):
            if offset is not None:
                _pwrite_all(fd, memoryview(packed), offset)

