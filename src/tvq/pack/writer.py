"""Writing one pack file: quantize, bit-pack, append, and record the manifest entry."""

from __future__ import annotations

from pathlib import Path

import torch

from tvq.io.safetensors_writer import StreamingSafetensorsWriter, sha256_file
from tvq.pack.manifest import AuxEntry, FileEntry, TensorEntry
from tvq.quant.packing import pack_codes
from tvq.quant.schemes import get_scheme


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

    def add_quantized(self, key: str, x: torch.Tensor, bits: int, scheme: str = "minmax", **opts) -> torch.Tensor:
        """Quantize ``x`` (fp32), store packed codes (+ aux arrays), return the reconstruction."""
        quantizer = get_scheme(scheme, bits)
        enc = quantizer.encode(x, bits, opts)
        shape = list(x.shape)
        if enc.constant is not None:
            self._tensors[key] = TensorEntry(kind="const", shape=shape, dtype="float32", bits=bits, value=enc.constant)
            return torch.full(tuple(shape), enc.constant, dtype=torch.float32)
        packed = pack_codes(enc.codes, bits)
        digest = self._writer.add(key, packed)
        aux = {}
        for name, arr in enc.aux.items():
            aux[name] = AuxEntry(nbytes=arr.numel() * arr.element_size(), sha256=self._writer.add(aux_key(key, name), arr))
        self._tensors[key] = TensorEntry(
            kind="q",
            shape=shape,
            dtype="float32",
            bits=bits,
            scheme=scheme,
            params=enc.params,
            aux=aux,
            nbytes=packed.numel(),
            sha256=digest,
        )
        return quantizer.decode(enc.codes, bits, enc.params, enc.aux).reshape(shape)

    def add_raw(self, key: str, tensor: torch.Tensor) -> None:
        """Store a tensor exactly as given (kept tensors: biases, norms, or FQ's originals)."""
        digest = self._writer.add(key, tensor)
        self._tensors[key] = TensorEntry(
            kind="raw",
            shape=list(tensor.shape),
            dtype=dtype_name(tensor.dtype),
            nbytes=tensor.numel() * tensor.element_size(),
            sha256=digest,
        )

    def close(self) -> FileEntry:
        size = self._writer.close()
        return FileEntry(bytes=size, sha256=sha256_file(self.root / self.rel_name), tensors=self._tensors)

    def abort(self) -> None:
        self._writer.abort()
