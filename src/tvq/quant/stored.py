"""A tensor in the form a pack file stores it: packed codes and parameters, raw, or a constant.

The encoders produce it and the pack writer writes it; it sits here, below both, so the
pack layer never imports the encoders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tvq.io.safetensors_writer import sha256_tensor
from tvq.quant.chunks import Converted
from tvq.quant.entropy import Coded, aligned_nbytes, decode, decode_raw_bytes, encode, encode_raw_bytes, packed_from_aligned, pays, to_aligned
from tvq.quant.fused import QuantResult, encode_chunks
from tvq.quant.kernels import realigned
from tvq.quant.packing import unpack_codes
from tvq.quant.schemes import decode_problem, decoded_bound, get_scheme


@dataclass
class StoredTensor:
    """What a pack file holds for one tensor, before it is written."""

    kind: Literal["q", "raw", "const"]
    shape: list[int]
    data: torch.Tensor | None = None  # packed codes (q; entropy-coded when ``entropy`` is set) or the tensor itself (raw)
    bits: int | None = None
    scheme: str | None = None
    params: dict[str, float] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    value: float | None = None  # const
    sha256: str | None = None  # of ``data``, when hashed already (by the worker that made it)
    entropy: Coded | None = None  # set when ``data`` holds entropy-coded codes or raw bytes (tvq.quant.entropy)
    dtype: torch.dtype | None = None  # raw: the tensor's dtype, set when ``data`` holds its coded bytes

    def decode_problem(self) -> str | None:
        """Why this could decode to NaN/Inf, or None: a const's value, a q tensor's scheme
        parameters (raw tensors are the finite τ or θ_t themselves, checked as inputs)."""
        if self.kind == "const":
            return None if self.value is not None and math.isfinite(self.value) else f"constant value {self.value}"
        if self.kind == "q":
            return decode_problem(str(self.scheme), int(self.bits or 0), self.params, self.aux)
        return None

    def largest(self) -> float:
        """The largest magnitude this decodes to (for q, a bound over every code)."""
        if self.kind == "const":
            return abs(float(self.value or 0.0))
        if self.kind == "raw":
            data = self.raw()
            return float(data.abs().max()) if data is not None and data.numel() else 0.0
        return decoded_bound(str(self.scheme), int(self.bits or 0), self.params, self.aux)

    def decoded(self) -> torch.Tensor:
        """The fp32 values this stands for, flat, as a pack reader decodes them."""
        n = math.prod(self.shape)
        if self.kind == "const" or self.data is None:
            return torch.full((n,), float(self.value or 0.0), dtype=torch.float32)
        if self.kind == "raw":
            return self.raw().reshape(-1).float()
        bits = int(self.bits or 0)
        return get_scheme(str(self.scheme)).decode(unpack_codes(self.packed(), bits, n), bits, self.params, self.aux)

    def packed(self) -> torch.Tensor:
        """A q tensor's bit-packed codes (decoded first when entropy-coded)."""
        if self.data is None:
            raise ValueError("no stored codes")
        if self.entropy is None:
            return self.data
        n, bits = math.prod(self.shape), int(self.bits or 0)
        aligned = decode(self.data, self.entropy.blocks, self.entropy.block, aligned_nbytes(n, bits))
        return packed_from_aligned(aligned, bits, n)

    def raw(self) -> torch.Tensor:
        """A raw tensor as it was given (decoded first when entropy-coded)."""
        if self.data is None:
            raise ValueError("no stored data")
        if self.entropy is None or self.dtype is None:
            return self.data
        total = math.prod(self.shape) * self.dtype.itemsize
        raw = decode_raw_bytes(self.data, self.entropy.blocks, self.entropy.block, total, self.dtype.itemsize)
        return raw.view(self.dtype).reshape(self.shape)

    def entropy_coded(self, strong: bool = False) -> StoredTensor:
        """Entropy-code a q tensor's codes or a raw tensor's bytes, in place, where that makes the
        pack smaller, the manifest's record of it included (run on the worker that made them,
        before hashing: the writer then only writes); ``strong``: zstd's optimal parser (same format)."""
        if self.data is None or self.entropy is not None or not self.data.numel():
            return self
        if self.kind == "raw":
            plain = self.data.numel() * self.data.element_size()
            stream, coded = encode_raw_bytes(self.data, strong=strong)
            if pays(stream.numel(), len(coded.blocks), plain):
                self.dtype = self.data.dtype
                self.data, self.entropy, self.sha256 = stream, coded, None
            return self
        if self.kind != "q":
            return self
        n, bits = math.prod(self.shape), int(self.bits or 0)
        aligned = realigned(self.data, bits, n)  # the same bytes, compiled
        stream, coded = encode(to_aligned(self.data, bits, n) if aligned is None else aligned, strong=strong)
        if pays(stream.numel(), len(coded.blocks), self.data.numel()):
            self.data, self.entropy, self.sha256 = stream, coded, None
        return self

    def hashed(self) -> StoredTensor:
        """Hash ``data`` now, on this thread: the writer (one driver thread) then only writes."""
        if self.data is not None and self.sha256 is None:
            self.sha256 = sha256_tensor(self.data)
        return self


def stored_form(result: QuantResult, shape: list[int], scheme: str) -> StoredTensor:
    """The stored form of one quantized tensor."""
    p = result.params
    if result.packed is None:
        return StoredTensor("const", shape, bits=p.bits, value=p.constant)
    return StoredTensor("q", shape, result.packed, p.bits, scheme, dict(p.scalars), dict(p.blocks))


def encode_raw(t: torch.Tensor) -> StoredTensor:
    return StoredTensor("raw", list(t.shape), t.contiguous())


def encode_quantized(x: torch.Tensor, bits: int, scheme: str = "minmax", **opts: Any) -> tuple[StoredTensor, torch.Tensor]:
    """Quantize ``x`` whole: the stored form (bit-packed codes) and the fp32 reconstruction."""
    spec = get_scheme(scheme, bits).spec(bits, opts)
    recon = torch.empty(x.shape, dtype=torch.float32)
    (result,) = encode_chunks([Converted(x)], x.numel(), spec, recon_out=recon.view(-1))
    return stored_form(result, list(x.shape), scheme), recon
