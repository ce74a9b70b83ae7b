"""Writing one pack file: quantize, bit-pack, append, and record the manifest entry."""

from __future__ import annotations

from pathlib import Path

import torch

from tvq.io.safetensors_writer import StreamingSafetensorsWriter, sha256_file
from tvq.pack.manifest import FileEntry, TensorEntry
from tvq.quant.minmax import minmax_dequantize, minmax_params, minmax_quantize
from tvq.quant.packing import pack_codes


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class PackFileWriter:
    """Streams the tensors of one pack file (a task's vector, or the RTVQ base)."""

    def __init__(self, root: Path, rel_name: str, names: list[str], metadata: dict[str, str] | None = None) -> None:
        self.root = root
        self.rel_name = rel_name
        (root / rel_name).parent.mkdir(parents=True, exist_ok=True)
        self._writer = StreamingSafetensorsWriter(root / rel_name, names, metadata)
        self._tensors: dict[str, TensorEntry] = {}

    def add_quantized(self, key: str, x: torch.Tensor, bits: int) -> torch.Tensor:
        """Quantize ``x`` (fp32) with the paper's quantizer, store packed codes, return deq(Q(x))."""
        params = minmax_params(x, bits)
        shape = list(x.shape)
        if params.constant is not None:
            self._tensors[key] = TensorEntry(kind="const", shape=shape, dtype="float32", bits=bits, value=params.constant)
            return torch.full(tuple(shape), params.constant, dtype=torch.float32)
        codes = minmax_quantize(x, params)
        packed = pack_codes(codes, bits)
        digest = self._writer.add(key, packed)
        self._tensors[key] = TensorEntry(
            kind="q",
            shape=shape,
            dtype="float32",
            bits=bits,
            scale=params.scale,
            zero_point=params.zero_point,
            nbytes=packed.numel(),
            sha256=digest,
        )
        return minmax_dequantize(codes, params, tuple(shape))

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
