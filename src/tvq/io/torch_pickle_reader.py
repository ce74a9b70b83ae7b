"""Pickled torch files read without their code: ``torch.save(module)`` checkpoints (the paper's
``zeroshot.pt`` / ``finetuned.pt``) and state dicts, one tensor at a time.

The file is parsed once (:mod:`tvq.io.torch_archive`, :mod:`tvq.io.torch_pickle`), the module
walked into a state dict (:mod:`tvq.io.module_state`), and every tensor's geometry checked
against its storage's bytes before anything is allocated. A tensor is read when asked for,
into a buffer of its own, with positional reads of just its bytes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from tvq.errors import CheckpointError, where
from tvq.io.checkpoint_base import ReaderBase, TensorMeta
from tvq.io.module_state import state_dict_refs, tensor_problem
from tvq.io.torch_archive import TorchArchive, open_archive, read_into
from tvq.io.torch_pickle import TensorRef

MAX_TENSOR_ELEMENTS = 1 << 32  # as for packs (tvq.pack.validate); TVQ_MAX_TENSOR_ELEMENTS raises it


def element_cap() -> int:
    value = os.environ.get("TVQ_MAX_TENSOR_ELEMENTS")
    return int(value) if value and value.isdigit() else MAX_TENSOR_ELEMENTS


class TorchPickleReader(ReaderBase):
    """A torch file's state dict, read lazily and without running the file's code."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.archive = open_archive(path)
        self.refs = state_dict_refs(self.archive.root, path)
        cap = element_cap()
        for key, ref in self.refs.items():
            span = self.archive.span(ref.storage)
            problem = tensor_problem(ref, span.nbytes // ref.storage.dtype.itemsize, cap)
            if problem is not None:
                raise CheckpointError(f"{where(path, key)}: {problem}")
        self._metas = {k: TensorMeta(r.shape, r.dtype) for k, r in self.refs.items()}
        self._fd = os.open(path, os.O_RDONLY)

    def get(self, key: str) -> torch.Tensor:
        """The tensor, contiguous, in a fresh buffer of its own."""
        ref = self.refs.get(key)
        if ref is None:
            raise CheckpointError(f"{where(self.path, key)}: no such tensor in this checkpoint")
        return read_tensor(self.archive, self._fd, ref, key)

    def share(self, alias: str, name: str) -> None:
        super().share(alias, name)
        self.refs[alias] = self.refs[name]

    def hide(self, key: str) -> None:
        super().hide(key)
        del self.refs[key]

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def element_range(ref: TensorRef) -> tuple[int, int]:
    """(first, count) of the storage elements (in the tensor's dtype) the tensor touches."""
    if math.prod(ref.shape) == 0:
        return ref.offset, 0
    return ref.offset, 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))


def read_tensor(archive: TorchArchive, fd: int, ref: TensorRef, key: str) -> torch.Tensor:
    """Read just the bytes ``ref`` spans, then lay them out as its shape and strides say."""
    first, count = element_range(ref)
    span = archive.span(ref.storage)
    flat = torch.empty(count, dtype=ref.dtype)
    if count:
        try:
            read_into(archive.path, fd, span, first * ref.dtype.itemsize, memoryview(flat.view(torch.uint8).numpy()).cast("B"))  # type: ignore[arg-type]
        except CheckpointError as exc:
            raise CheckpointError(f"{where(archive.path, key)}: {str(exc).split(': ', 1)[-1]}") from None
    if is_dense(ref):
        return flat.reshape(ref.shape)
    return flat.as_strided(ref.shape, ref.stride).contiguous()


def is_dense(ref: TensorRef) -> bool:
    """Whether the tensor is laid out row-major without gaps (the usual case)."""
    expected = 1
    for n, s in zip(reversed(ref.shape), reversed(ref.stride), strict=True):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True
