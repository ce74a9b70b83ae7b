"""Writing one pack file: append encoded tensors and record their manifest entries."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from tvq.io.dtypes import dtype_name
from tvq.io.safetensors_writer import (
    StreamingSafetensorsWriter,
    sha256_file,
    sha256_tensor,
)
from tvq.pack.manifest import (
    AuxEntry,
    ConstEntry,
    EntropyEntry,
    FileEntry,
    QuantizedEntry,
    RawEntry,
    TensorEntry,
    aux_key,
)
from tvq.pack.manifest import (
    announced_names as announced_names,  # re-exported: its home is tvq.pack.manifest
)
from tvq.quant.entropy import CODER, Coded


class Stored(Protocol):
    """One encoded tensor, as an encoder hands it over (tvq.encode.StoredTensor): ``q`` (packed
    codes in ``data``, or entropy-coded ones with their record in ``entropy``, ``bits``,
    ``scheme``, ``params``, ``aux`` arrays), ``raw`` (the tensor in ``data``, or its entropy-coded
    bytes with their record in ``entropy`` and the tensor's dtype in ``dtype``) or ``const``
    (``value``); ``sha256`` of ``data`` when already computed."""

    @property
    def kind(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def data(self) -> torch.Tensor | None: ...
    @property
    def bits(self) -> int | None: ...
    @property
    def scheme(self) -> str | None: ...
    @property
    def params(self) -> dict[str, float]: ...
    @property
    def aux(self) -> dict[str, torch.Tensor]: ...
    @property
    def value(self) -> float | None: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def entropy(self) -> Coded | None: ...
    @property
    def dtype(self) -> torch.dtype | None: ...


class PackFileWriter:
    """Streams the tensors of one pack file (a task's vector, or the RTVQ base)."""

    def __init__(self, root: Path, rel_name: str, names: list[str], metadata: dict[str, str] | None = None) -> None:
        self.root = root
        self.rel_name = rel_name
        (root / rel_name).parent.mkdir(parents=True, exist_ok=True)
        self._writer = StreamingSafetensorsWriter(root / rel_name, names, metadata)
        self._tensors: dict[str, TensorEntry] = {}

    def add(self, key: str, stored: Stored) -> None:
        """Append one encoded tensor (codes + aux arrays, raw data, or nothing for a constant)."""
        self._tensors[key] = self._entry(key, stored)

    def _entry(self, key: str, stored: Stored) -> TensorEntry:
        if stored.kind == "const" and stored.value is not None:
            return ConstEntry(shape=stored.shape, bits=stored.bits, value=stored.value)
        data = stored.data
        if data is None or stored.kind not in ("q", "raw"):
            raise ValueError(f"{key}: a {stored.kind!r} tensor without its data or value")
        self._writer.add(key, data)
        digest = stored.sha256 or sha256_tensor(data)
        nbytes = data.numel() * data.element_size()
        coded = stored.entropy
        entropy = EntropyEntry(coder=CODER, filter=coded.filter, block=coded.block, blocks=list(coded.blocks)) if coded is not None else None
        if stored.kind == "raw":
            dtype = stored.dtype if coded is not None and stored.dtype is not None else data.dtype
            return RawEntry(shape=stored.shape, dtype=dtype_name(dtype), nbytes=nbytes, sha256=digest, entropy=entropy)
        if stored.bits is None or stored.scheme is None:
            raise ValueError(f"{key}: codes without their bits or scheme")
        aux = {}
        for name, arr in stored.aux.items():
            self._writer.add(aux_key(key, name), arr)
            aux[name] = AuxEntry(nbytes=arr.numel() * arr.element_size(), sha256=sha256_tensor(arr))
        return QuantizedEntry(shape=stored.shape, bits=stored.bits, scheme=stored.scheme, params=stored.params, aux=aux, nbytes=nbytes,
                              sha256=digest, entropy=entropy)  # fmt: skip

    def close(self) -> FileEntry:
        size = self._writer.close()
        return FileEntry(bytes=size, sha256=sha256_file(self.root / self.rel_name), tensors=self._tensors)

    def abort(self) -> None:
        self._writer.abort()


def close_all(writers: Mapping[str, PackFileWriter]) -> dict[str, FileEntry]:
    """Close pack files, hashing them side by side (hashlib releases the GIL): same entries."""
    if not writers:
        return {}
    with ThreadPoolExecutor(min(len(writers), os.cpu_count() or 1)) as pool:
        return dict(zip(writers, pool.map(PackFileWriter.close, writers.values()), strict=True))
