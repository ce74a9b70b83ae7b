"""The one quantizer primitive, in torchao's shape: choose parameters, quantize, dequantize.

A quantizer is a ``QuantSpec``: a bit width, a mapping (how codes stand for values), a range
estimator (which range the grid covers) and a block size (the whole tensor, or groups of
consecutive elements). The six scheme names of ``tvq.quant.schemes`` are presets of it.
Quantize and dequantize work on one chunk of a flat tensor; ``tvq.quant.fused`` runs them
over a tensor or a stream of chunks, and a plain call is that run with one source.

Every op, and its order, is the one tvq's packs were always written with, so packs stay
byte-identical: fp32 arithmetic, round half to even, and the paper's
scale = (2^b − 1)/(max − min), zero_point = −round(scale·min) (``affine_from_range``; fp32
for min–max, as in AIM-SKKU/TVQ, Python floats for an MSE-clipped range).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import TypeVar

import torch

from tvq.device import divide_, divisor_for
from tvq.errors import EncodeError
from tvq.quant.chunks import CHUNK

NOT_FINITE = "values are not finite in float32"
SAMPLE = 1 << 20  # the MSE and ternary searches run on an evenly spaced sample of this many elements


class MappingType(str, Enum):
    """How b-bit codes stand for values."""

    ASYMMETRIC = "asymmetric"  # codes 0 … 2^b − 1 spread over [min, max] (the paper's)
    SYMMETRIC = "symmetric"  # codes −L … L (stored offset by L = 2^(b−1) − 1) around an exact zero
    TERNARY = "ternary"  # {−α, 0, +α}: a threshold and α fitted to the L2 error
    SIGN = "sign"  # {−α, +α}, α = mean|x| (the L2-optimal scale of a sign code)


class RangeEstimator(str, Enum):
    """Which range an affine grid covers (ternary and sign fit their own α)."""

    MINMAX = "minmax"  # the values' own min and max: the paper's
    MSE = "mse"  # [α·min, α·max], α searched to minimise the L2 error on a sample


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    mapping: MappingType = MappingType.ASYMMETRIC
    estimator: RangeEstimator = RangeEstimator.MINMAX
    block_size: int | None = None  # elements per block: None is one block, the whole tensor
    grid: int = 40  # MSE: clip factors tried

    @property
    def streams(self) -> bool:
        """Whether the parameters follow from the min and max alone, which one pass over
        chunks gathers; the other estimators read the whole tensor."""
        minmax = self.estimator is RangeEstimator.MINMAX and self.block_size is None
        return minmax and self.mapping in (MappingType.ASYMMETRIC, MappingType.SYMMETRIC)


@dataclass(frozen=True, eq=False)
class QParams:
    """One tensor's parameters: the scalars a manifest records (by their stored names), the
    per-block arrays stored beside the codes, or the constant the whole tensor equals."""

    bits: int
    mapping: MappingType
    scalars: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)  # per block: lo, step
    constant: float | None = None
    block_size: int | None = None  # elements per block, at most the tensor's

    @property
    def scale(self) -> float:
        """Asymmetric: the inverse step, as in the paper's code."""
        return self.scalars["scale"]

    @property
    def zero_point(self) -> float:
        return self.scalars["zero_point"]

    @cached_property
    def fp32(self) -> dict[str, torch.Tensor]:
        """The operands of the fp32 ops, made once per tensor: 0-dim scale and zero point, or
        per block lo, step and the divisor (a zero step divides by one)."""
        if self.blocks:
            step = self.blocks["step"]
            return {"lo": self.blocks["lo"], "step": step, "safe": torch.where(step > 0, step, torch.ones_like(step))}
        if self.mapping is MappingType.ASYMMETRIC and self.constant is None:
            return {name: torch.tensor(self.scalars[name], dtype=torch.float32) for name in ("scale", "zero_point")}
        return {}


def finite(value: float, problem: str = NOT_FINITE) -> float:
    """``value`` (a range end, a magnitude or a mean computed anyway), which must be finite:
    NaN/Inf there means NaN/Inf in the values, or a statistic overflowing fp32."""
    if not math.isfinite(value):
        raise EncodeError(problem)
    return value


# -- choosing parameters ---------------------------------------------------------------------

R = TypeVar("R", torch.Tensor, float)


def affine_from_range(lo: R, hi: R, bits: int) -> tuple[R, R]:
    """The paper's asymmetric parameters of [lo, hi]: scale = (2^b − 1)/(hi − lo) and
    zero_point = −round(scale·lo), in the arithmetic of ``lo`` and ``hi``: fp32 0-dim tensors
    for the min–max range (the reference's ops, bit for bit), Python floats for a clipped one."""
    scale = (2**bits - 1) / (hi - lo)
    product = scale * lo
    rounded = torch.round(product) if isinstance(product, torch.Tensor) else round(product)
    return scale, -1 * rounded  # type: ignore[return-value]


def _affine(bits: int, scale: float, zero_point: float, lo: float, hi: float, **extra: float) -> QParams:
    """Checked asymmetric parameters: a scale that is 0 (max − min overflows fp32) or infinite
    (a range too narrow for fp32 at these bits) would store codes that decode to NaN/Inf."""
    if not (0 < scale < math.inf and math.isfinite(zero_point)):
        raise EncodeError(f"its range [{lo:.7g}, {hi:.7g}] cannot be quantized in float32 at {bits} bits (scale {scale:g})")
    return QParams(bits, MappingType.ASYMMETRIC, {"scale": scale, "zero_point": zero_point, **extra})


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> QParams:
    """The paper's per-tensor min–max parameters from the range as fp32 0-dim tensors; a
    constant tensor (max = min) is flagged as such instead of becoming NaN, as the reference's
    would. A non-finite range is an EncodeError."""
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise EncodeError(NOT_FINITE)
    if lo_f == hi_f:
        return QParams(bits, MappingType.ASYMMETRIC, constant=lo_f)
    scale, zero_point = affine_from_range(lo, hi, bits)
    return _affine(bits, float(scale), float(zero_point), lo_f, hi_f)


def params_from_minmax(spec: QuantSpec, lo: float, hi: float) -> QParams:
    """The parameters of a streaming spec (``spec.streams``) from the values' min and max."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise EncodeError(NOT_FINITE)
    if spec.mapping is MappingType.ASYMMETRIC:
        return params_from_range(torch.tensor(lo), torch.tensor(hi), spec.bits)
    amax = max(abs(lo), abs(hi))  # = max|x|, exactly
    if amax == 0:
        return QParams(spec.bits, spec.mapping, constant=0.0)
    levels = 2 ** (spec.bits - 1) - 1
    step = float(torch.tensor(amax / levels, dtype=torch.float32))
    return QParams(spec.bits, spec.mapping, {"step": step, "offset": levels})


def choose_qparams(spec: QuantSpec, flat: torch.Tensor) -> QParams:
    """Parameters of a whole tensor, ``flat`` (fp32, 1-D, contiguous)."""
    if spec.streams:
        lo, hi = torch.aminmax(flat)
        return params_from_minmax(spec, float(lo), float(hi))
    if spec.mapping is MappingType.ASYMMETRIC:
        lo_f, hi_f = (finite(float(v)) for v in torch.aminmax(flat))
        if lo_f == hi_f:
            return QParams(spec.bits, spec.mapping, constant=lo_f)
        if spec.block_size is not None:
            return _block_params(spec, flat, spec.block_size)
        return _mse_params(spec, flat, lo_f, hi_f)
    if spec.mapping is MappingType.TERNARY:
        return _ternary_params(spec, flat)
    alpha = finite(float(flat.abs().mean()), "values are not finite in float32, or their mean magnitude overflows it")
    if alpha == 0:
        return QParams(spec.bits, spec.mapping, constant=0.0)
    return QParams(spec.bits, spec.mapping, {"alpha": alpha})


def _sample(flat: torch.Tensor) -> torch.Tensor:
    """The fixed, evenly spaced sample a search runs on (the whole tensor when small)."""
    return flat if flat.numel() <= SAMPLE else flat[:: flat.numel() // SAMPLE]


def _mse_params(spec: QuantSpec, flat: torch.Tensor, lo: float, hi: float) -> QParams:
    """min–max on [α·min, α·max], α from 1.0 down to 0.1 minimising the sample's L2 error."""
    sample, qmax = _sample(flat), 2**spec.bits - 1
    best = (float("inf"), 1.0)
    for i in range(spec.grid):
        alpha = 1.0 - 0.9 * i / spec.grid
        a_lo, a_hi = alpha * lo, alpha * hi
        if a_hi <= a_lo:
            continue
        scale, zp = affine_from_range(a_lo, a_hi, spec.bits)
        deq = (torch.clamp(torch.round(sample * scale + zp), 0, qmax) - zp) / scale
        err = float((deq - sample).pow(2).sum())
        if err < best[0]:
            best = (err, alpha)
    return clipped_params(spec.bits, lo, hi, best[1])


def clipped_params(bits: int, lo: float, hi: float, clip: float) -> QParams:
    """The MSE scheme's parameters once its clip factor is chosen: min–max on [clip·lo, clip·hi]."""
    a_lo, a_hi = clip * lo, clip * hi
    scale, zp = affine_from_range(a_lo, a_hi, bits)
    return _affine(bits, float(torch.tensor(scale, dtype=torch.float32)), float(zp), a_lo, a_hi, clip=clip)


def _rows(flat: torch.Tensor, block: int) -> torch.Tensor:
    """``flat`` as rows of ``block``, the last padded with its last value (range unchanged)."""
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, block)


def block_of(block_size: int, n: int) -> int:
    """The block a tensor of ``n`` elements is cut into: a block larger than the tensor is
    the tensor (the same codes and ranges as padding would give; an absurd size allocates nothing)."""
    return max(1, min(block_size, n))


def _block_params(spec: QuantSpec, flat: torch.Tensor, block_size: int) -> QParams:
    """Asymmetric min–max per block, stored as each block's lo and step = (hi − lo)/(2^b − 1)."""
    block = block_of(block_size, flat.numel())
    rows = _rows(flat, block)
    lo = rows.min(dim=1).values
    step = (rows.max(dim=1).values - lo) / (2**spec.bits - 1)
    if not bool(torch.isfinite(step).all()):  # one value per block: cheap
        raise EncodeError("a group's range (max − min) overflows float32")
    return QParams(spec.bits, spec.mapping, {"group_size": block_size}, {"lo": lo, "step": step}, block_size=block)


def _ternary_params(spec: QuantSpec, flat: torch.Tensor) -> QParams:
    """Threshold t·mean|x| (t = 0.05 … 1.5) and α = mean of the kept |x|, minimising the
    sample's L2 error."""
    mag = flat.abs()
    if finite(float(mag.max())) == 0:
        return QParams(spec.bits, spec.mapping, constant=0.0)
    sample = _sample(mag)
    best = (float("inf"), 0.0, 0.0)
    mean = float(sample.mean())
    for i in range(1, 31):
        thr = mean * 0.05 * i
        kept = sample > thr
        if not bool(kept.any()):
            break
        alpha = float(sample[kept].mean())
        err = float(((sample - alpha).pow(2) * kept).sum() + (sample.pow(2) * ~kept).sum())
        if err < best[0]:
            best = (err, thr, alpha)
    _, thr, alpha = best
    return QParams(spec.bits, spec.mapping, {"alpha": alpha, "threshold": thr})


# -- quantize and dequantize one chunk -------------------------------------------------------


def _by_block(n: int, start: int, block: int, fn: Callable[[slice, slice, int], None]) -> None:
    """Call ``fn(elements, blocks, width)`` over the chunk of ``n`` elements at ``start``, a run
    of whole blocks at a time (a chunk may begin or end inside a block): each run is a view
    ``[blocks, width]`` that the per-block operands broadcast over."""
    pos = 0
    while pos < n:
        first, offset = divmod(start + pos, block)
        if offset or n - pos < block:
            width, rows = min(block - offset, n - pos), 1
        else:
            width, rows = block, (n - pos) // block
        fn(slice(pos, pos + rows * width), slice(first, first + rows), width)
        pos += rows * width


def quantize_into(x: torch.Tensor, qp: QParams, out: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The codes of ``x`` (fp32 chunk of a flat tensor, at element ``start``) as exact
    integers in fp32, into ``out`` (not ``x``'s memory). ``qp`` must not be a constant."""
    qmax = 2**qp.bits - 1
    if qp.mapping is MappingType.ASYMMETRIC and qp.block_size is None:
        ops = qp.fp32
        return torch.mul(x, ops["scale"], out=out).add_(ops["zero_point"]).round_().clamp_(0, qmax)
    if qp.mapping is MappingType.ASYMMETRIC:
        ops = qp.fp32

        def rows(elements: slice, blocks: slice, width: int) -> None:
            part = out[elements].view(-1, width)
            torch.sub(x[elements].view(-1, width), ops["lo"][blocks, None], out=part)
            part.div_(ops["safe"][blocks, None]).round_().clamp_(0, qmax)

        _by_block(x.numel(), start, int(qp.block_size or 1), rows)
        return out
    if qp.mapping is MappingType.SYMMETRIC:
        levels = int(qp.scalars["offset"])
        return torch.div(x, divisor_for(x, qp.scalars["step"]), out=out).round_().clamp_(-levels, levels).add_(levels)
    if qp.mapping is MappingType.TERNARY:
        thr = qp.scalars["threshold"]
        return out.fill_(1).masked_fill_(x < -thr, 0).masked_fill_(x > thr, 2)
    return out.copy_(x > 0)


def dequantize_(q: torch.Tensor, qp: QParams, start: int = 0) -> torch.Tensor:
    """Codes (fp32, a chunk at element ``start``) to values, in place."""
    if qp.constant is not None:
        return q.fill_(qp.constant)
    if qp.mapping is MappingType.ASYMMETRIC and qp.block_size is None:
        ops = qp.fp32
        return divide_(q.sub_(ops["zero_point"]), ops["scale"])
    if qp.mapping is MappingType.ASYMMETRIC:
        ops = qp.fp32

        def rows(elements: slice, blocks: slice, width: int) -> None:
            q[elements].view(-1, width).mul_(ops["step"][blocks, None]).add_(ops["lo"][blocks, None])

        _by_block(q.numel(), start, int(qp.block_size or 1), rows)
        return q
    if qp.mapping is MappingType.SYMMETRIC:
        return q.sub_(qp.scalars["offset"]).mul_(qp.scalars["step"])
    if qp.mapping is MappingType.TERNARY:
        return q.sub_(1).mul_(qp.scalars["alpha"])
    return q.mul_(2).sub_(1).mul_(qp.scalars["alpha"])


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """The codes of a whole tensor as a flat uint8 tensor (none for a constant), a chunk at a
    time through reused fp32 buffers: no full-size temporaries, and ``x`` may be bf16."""
    flat = x.reshape(-1)
    n = flat.numel()
    out = torch.zeros(n if qp.constant is None else 0, dtype=torch.uint8)
    if qp.constant is not None:
        return out
    x_buf = torch.empty(min(CHUNK, n) if flat.dtype != torch.float32 else 0, dtype=torch.float32)
    q_buf = torch.empty(min(CHUNK, n), dtype=torch.float32)
    for start in range(0, n, CHUNK):
        part = flat[start : start + CHUNK]
        chunk = part if part.dtype == torch.float32 else x_buf[: part.numel()].copy_(part)
        out[start : start + part.numel()].copy_(quantize_into(chunk, qp, q_buf[: part.numel()], start))
    return out


def dequantize(codes: torch.Tensor, qp: QParams, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """fp32 values of a whole tensor's codes (in place on the fp32 output: no temporaries)."""
    if qp.constant is not None:
        return torch.full(shape if shape is not None else (codes.numel(),), qp.constant, dtype=torch.float32)
    out = dequantize_(codes.reshape(-1).to(torch.float32), qp)
    return out if shape is None else out.reshape(shape)


# -- the paper's per-tensor min–max, by name -------------------------------------------------


def minmax_params(x: torch.Tensor, bits: int) -> QParams:
    """The paper's scale and zero point of ``x`` (one ``aminmax`` pass, fp32)."""
    lo, hi = torch.aminmax(x if x.dtype == torch.float32 else x.float())
    return params_from_range(lo, hi, bits)


def minmax_quantize(x: torch.Tensor, params: QParams) -> torch.Tensor:
    """Integer codes in [0, 2^b − 1] as a flat uint8 tensor (all zeros for a constant)."""
    if params.constant is not None:
        return torch.zeros(x.numel(), dtype=torch.uint8)
    return quantize(x, params)


def minmax_dequantize(codes: torch.Tensor, params: QParams, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 reconstruction (q − zero_point) / scale, reshaped to ``shape``."""
    return dequantize(codes, params, shape)


def fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize (fp32), for error measurement and tests."""
    params = minmax_params(x, bits)
    return minmax_dequantize(minmax_quantize(x, params), params, tuple(x.shape))
