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

A large merged tensor may come as consecutive flat pieces (``ChunkedTensor``: a tensor merged
by blocks, ``tvq.merge.blocks.Chunked``); a dense one is written piece by piece where it
lies, so the writer never holds it whole.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from tvq.errors import CheckpointError, ConfigError, where
from tvq.io.checkpoint_base import CheckpointReader
from tvq.io.torch_archive import TorchArchive, read_into
from tvq.io.torch_pickle import TensorRef
from tvq.io.torch_pickle_reader import TorchPickleReader, element_range, is_dense, read_tensor

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CRC_CHUNK = 16 << 20


class ChunkedTensor(Protocol):
    """A tensor as consecutive flat pieces, in order (``tvq.merge.blocks.Chunked`` is one):
    declared here because tvq.io sits below tvq.merge and must not import it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: Iterator[torch.Tensor]


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


def write_like(template: Path, tensors: Iterable[tuple[str, torch.Tensor | ChunkedTensor]], tmp: Path, dtype: torch.dtype | None = None) -> int:
    """Write ``tensors`` (every tensor of the template's state dict, any order; each whole or
    as consecutive flat pieces) into a copy of ``template`` at ``tmp``; returns the file's size.
    ``dtype`` (a requested output dtype) must be every float tensor's own: the program fixes
    each storage's type."""
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
            shared = ref.storage.key in sharing
            if isinstance(tensor, torch.Tensor):
                _write_tensor(source.archive, fd, ref, tensor)
                written[key] = _digest(tensor) if shared else ""
            else:
                written[key] = _write_chunked(source.archive, fd, ref, tensor, where(template, key), shared)
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


def _pieces(tensor: ChunkedTensor, name: str, count: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first element, flat contiguous piece) of each piece on the host, checked: the tensor's
    dtype, and exactly ``count`` elements in all (never a byte past the tensor's own)."""
    done = 0
    for piece in tensor.chunks:
        if piece.dtype != tensor.dtype:
            got, expected = (str(d).removeprefix("torch.") for d in (piece.dtype, tensor.dtype))
            raise CheckpointError(f"{name}: a piece of {got}, expected {expected}")
        flat = piece.detach().to("cpu").contiguous().reshape(-1)
        if done + flat.numel() > count:
            raise CheckpointError(f"{name}: pieces of more than the tensor's {count} elements")
        yield done, flat
        done += flat.numel()
    if done != count:
        raise CheckpointError(f"{name}: pieces of {done} elements, the tensor has {count}")


def _write_chunked(archive: TorchArchive, fd: int, ref: TensorRef, tensor: ChunkedTensor, name: str, digest: bool) -> str:
    """A tensor given by pieces; returns its digest when ``digest`` (the one ``_digest`` gives the
    whole tensor), else "". Dense: each piece written where it lies as it arrives and hashed
    as it passes, so the tensor is never held whole. A strided view is gathered first (rare)."""
    numel = math.prod(ref.shape)
    if not is_dense(ref):
        whole = torch.empty(numel, dtype=ref.dtype)
        for start, flat in _pieces(tensor, name, numel):
            whole[start : start + flat.numel()] = flat
        values = whole.reshape(ref.shape)
        _write_tensor(archive, fd, ref, values)
        return _digest(values) if digest else ""
    first = element_range(ref)[0]
    span = archive.span(ref.storage)
    itemsize = ref.dtype.itemsize
    hasher = hashlib.sha256()
    for start, flat in _pieces(tensor, name, numel):
        data = memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
        _pwrite_all(fd, data, span.offset + (first + start) * itemsize)
        if digest:
            hasher.update(data)
    return hasher.hexdigest() if digest and numel else ""


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
