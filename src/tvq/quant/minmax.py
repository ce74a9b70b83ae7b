"""The paper's quantizer: asymmetric min-max, one scale per tensor, round half to even.

Reproduces AIM-SKKU/TVQ ``asymmetric_quantization`` bit for bit: the same fp32 operations
in the same order (scale = (2^b-1)/(max-min), zero_point = -round(scale*min),
q = clamp(round(scale*x + zero_point), 0, 2^b-1), x_hat = (q - zero_point)/scale).
Unlike the original, a constant tensor (max == min) is not turned into NaN: it is flagged
as constant and dequantizes to exactly its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tvq.errors import EncodeError

MIN_BITS, MAX_BITS = 1, 8
NOT_FINITE = "values are not finite in float32"


_CHUNK = 1 << 18  # elements per chunk: small temporaries are reused by the allocator (7x faster than 16M)


@dataclass(frozen=True)
class MinMaxParams:
    """Per-tensor parameters; ``scale`` is the inverse step, as in the paper's code."""

    bits: int
    scale: float
    zero_point: float
    constant: float | None = None  # set when max == min: every element equals this value


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        from tvq.errors import ConfigError

        raise ConfigError(f"{what}={bits!r} is out of range: choose an integer from {MIN_BITS} to {MAX_BITS}")
    return bits


def minmax_params(x: torch.Tensor, bits: int) -> MinMaxParams:
    """Compute scale and zero point from the tensor's range (fp32, like the reference).
    One ``aminmax`` pass gives the same min and max as two reductions."""
    lo, hi = torch.aminmax(x if x.dtype == torch.float32 else x.float())
    return params_from_range(lo, hi, bits)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> MinMaxParams:
    """Scale and zero point from the range as fp32 0-dim tensors (the reference's fp32 ops).

    A non-finite range, or one whose scale is 0 (max − min overflows fp32) or infinite (a
    range too narrow for fp32 at these bits), is an EncodeError: the reference would store
    parameters that decode to NaN/Inf."""
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise EncodeError(NOT_FINITE)
    if lo_f == hi_f:
        return MinMaxParams(bits, 1.0, 0.0, constant=lo_f)
    qmax = 2**bits - 1
    scale = qmax / (hi - lo)
    zero_point = -1 * torch.round(scale * lo)
    params = MinMaxParams(bits, float(scale), float(zero_point))
    if not (0 < params.scale < math.inf and math.isfinite(params.zero_point)):
        raise EncodeError(f"its range [{lo_f:.7g}, {hi_f:.7g}] cannot be quantized in float32 at {bits} bits (scale {params.scale:g})")
    return params


def scalar_tensors(params: MinMaxParams) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(params.scale, dtype=torch.float32), torch.tensor(params.zero_point, dtype=torch.float32)


def minmax_quantize(x: torch.Tensor, params: MinMaxParams) -> torch.Tensor:
    """Integer codes in [0, 2^b-1] as a flat uint8 tensor.

    The reference's ops in its order (mul, add, round, clamp), in place on one reused
    chunk buffer: no full-size temporaries, and ``x`` may be bf16 (converted per chunk)."""
    flat = x.reshape(-1)
    if params.constant is not None:
        return torch.zeros(flat.numel(), dtype=torch.uint8)
    scale, zero_point = scalar_tensors(params)
    qmax = 2**params.bits - 1
    out = torch.empty(flat.numel(), dtype=torch.uint8)
    buf = torch.empty(min(_CHUNK, flat.numel()), dtype=torch.float32)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        tmp = buf[: part.numel()]
        tmp.copy_(part)
        tmp.mul_(scale).add_(zero_point).round_().clamp_(0, qmax)
        out[start : start + part.numel()].copy_(tmp)
    return out


def minmax_dequantize(codes: torch.Tensor, params: MinMaxParams, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 reconstruction (q - zero_point) / scale, reshaped to ``shape``."""
    if params.constant is not None:
        return torch.full(shape, params.constant, dtype=torch.float32)
    scale, zero_point = scalar_tensors(params)
    out = codes.to(torch.float32).reshape(shape)  # in place on the output: no temporaries to chunk
    return out.sub_(zero_point).div_(scale)


def fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize (fp32), for error measurement and tests."""
    params = minmax_params(x, bits)
    return minmax_dequantize(minmax_quantize(x, params), params, tuple(x.shape))
