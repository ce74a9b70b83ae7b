"""Writing one pack file: quantize, bit-pack, append, and record the manifest entry."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tvq.io.safetensors_writer import StreamingSafetensorsWriter, sha256_file, sha256_tensor
from tvq.encode import StoredTensor, encode_quantized, encode_raw
from tvq.pack.manifest import AuxEntry, FileEntry, TensorEntry


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def aux_key(key: str, name: str) -> str:
    return f"{key}::{name}"


def announced_names(keys: list[str], quantized: set[str], aux_names: tuple[str, ...]) -> list[str]:
    """Every tensor name a pack file may hold: the keys, plus aux arrays of quantized ones."""
    return [*keys, *(aux_key(k, a) for k in keys if k in quantized for a in aux_names)]


class PackFileWriter:
    """Streams the tensors of one pack file (a task's vector, or the RTVQ base)."""

    def __init__(self, root: Path, rel_name: str, names: list[str], metadata: dict[str, str] | None = None) -> None:
        self.root = root
        self.rel_name = rel_name
        (root / rel_name).parent.mkdir(parents=True, exist_ok=True)
        self._writer = StreamingSafetensorsWriter(root / rel_name, names, metadata)
        self._tensors: dict[str, TensorEntry] = {}

    def add(self, key: str, stored: StoredTensor) -> None:
        """Append one encoded tensor (codes + aux arrays, raw data, or nothing for a constant)."""
        if stored.kind == "const":
            self._tensors[key] = TensorEntry(kind="const", shape=stored.shape, dtype="float32", bits=stored.bits, value=stored.value)
            return
        data = stored.data
        self._writer.add(key, data)
        digest = stored.sha256 or sha256_tensor(data)
        aux = {}
        for name, arr in stored.aux.items():
            self._writer.add(aux_key(key, name), arr)
            aux[name] = AuxEntry(nbytes=arr.numel() * arr.element_size(), sha256=sha256_tensor(arr))
        self._tensors[key] = TensorEntry(
            kind=stored.kind,
            shape=stored.shape,
            dtype="float32" if stored.kind == "q" else dtype_name(data.dtype),
            bits=stored.bits,
            scheme=stored.scheme,
            params=stored.params,
            aux=aux,
            nbytes=data.numel() * data.element_size(),
            sha256=digest,
        )

    def add_quantized(self, key: str, x: torch.Tensor, bits: int, scheme: str = "minmax", **opts) -> torch.Tensor:
        """Quantize ``x`` (fp32), store it, and return the reconstruction."""
        stored, recon = encode_quantized(x, bits, scheme, **opts)
        self.add(key, stored)
        return recon

    def add_raw(self, key: str, tensor: torch.Tensor) -> None:
        """Store a tensor exactly as given (kept tensors: biases, norms, or FQ's originals)."""
        self.add(key, encode_raw(tensor))

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
