"""Quantization schemes: the names a pack records, each a preset of the one primitive.

A scheme maps a bit width (and options, or the parameters a pack stored) to a
``tvq.quant.affine.QuantSpec``; encoding and decoding are the primitive's. Storage layout
(bit packing, files) is not this module's business.

* ``minmax``    the paper's per-tensor asymmetric min-max (bit-exact with its code).
* ``mse``       min-max on a clipped range [α·min, α·max], α chosen to minimise the L2 error.
* ``group``     asymmetric min-max per group of ``group_size`` consecutive elements.
* ``symmetric`` signed grid around an exact zero: step = max|x| / (2^(b-1) - 1).
* ``ternary``   {-α, 0, +α} (2-bit codes), threshold and α fitted to minimise the L2 error.
* ``sign``      1 bit: α·sign(x) with α = mean|x| (the L2-optimal scale for a sign code).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tvq.errors import ConfigError
from tvq.quant.affine import (
    MappingType,
    QParams,
    QuantSpec,
    RangeEstimator,
    block_of,
    choose_qparams,
    dequantize,
    quantize,
)

Options = dict[str, Any]  # a scheme's options (group_size) or the parameters a pack stored


@dataclass
class Encoded:
    codes: torch.Tensor  # flat uint8, values < 2^bits
    params: dict[str, float] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    constant: float | None = None  # the whole tensor equals this value: no codes stored


@dataclass(frozen=True)
class Scheme:
    name: str
    spec: Callable[[int, Options], QuantSpec]  # the preset: bit width and options -> quantizer
    bits: tuple[int, ...] = tuple(range(1, 9))
    doc: str = ""
    aux_names: tuple[str, ...] = ()
    param_names: frozenset[str] = frozenset()  # exactly the scalar parameters it stores

    def encode(self, x: torch.Tensor, bits: int, opts: Options) -> Encoded:
        """Codes (unpacked) and parameters of a whole tensor."""
        qp = choose_qparams(self.spec(bits, opts), x.reshape(-1).float())
        if qp.constant is not None:
            return Encoded(torch.empty(0, dtype=torch.uint8), constant=qp.constant)
        return Encoded(quantize(x, qp), dict(qp.scalars), dict(qp.blocks))

    def params(self, bits: int, params: dict[str, float], aux: dict[str, torch.Tensor], n: int) -> QParams:
        """The primitive's parameters of ``n`` stored codes, from what a pack records."""
        spec = self.spec(bits, params)
        block = block_of(spec.block_size, n) if spec.block_size is not None else None
        return QParams(bits, spec.mapping, dict(params), dict(aux), block_size=block)

    def decode(self, codes: torch.Tensor, bits: int, params: dict[str, float], aux: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 values of stored codes, flat."""
        return dequantize(codes, self.params(bits, params, aux, codes.numel()))


@dataclass(frozen=True)
class Quantizer:
    """A scheme at one bit width, with its options: what an encoder is given."""

    scheme: str
    spec: QuantSpec

    @property
    def bits(self) -> int:
        return self.spec.bits


SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str, bits: int | None = None) -> Scheme:
    scheme = SCHEMES.get(name)
    if scheme is None:
        raise ConfigError(f"unknown quantizer {name!r}; valid: {', '.join(SCHEMES)}")
    if bits is not None and bits not in scheme.bits:
        raise ConfigError(f"quantizer {name!r} supports bits {', '.join(map(str, scheme.bits))}, not {bits}")
    return scheme


def quantizer(name: str, bits: int, opts: Options | None = None) -> Quantizer:
    return Quantizer(name, get_scheme(name, bits).spec(bits, opts or {}))


register(Scheme("minmax", lambda bits, opts: QuantSpec(bits), doc="paper: per-tensor asymmetric min-max",
                param_names=frozenset({"scale", "zero_point"})))  # fmt: skip
register(Scheme("mse", lambda bits, opts: QuantSpec(bits, estimator=RangeEstimator.MSE, grid=opts.get("grid", 40)),
                doc="min-max on an MSE-optimal clipped range", param_names=frozenset({"scale", "zero_point", "clip"})))  # fmt: skip
register(Scheme("group", lambda bits, opts: QuantSpec(bits, block_size=int(opts.get("group_size", 128))),
                doc="asymmetric min-max per group of group_size elements", aux_names=("lo", "step"),
                param_names=frozenset({"group_size"})))  # fmt: skip
register(Scheme("symmetric", lambda bits, opts: QuantSpec(bits, MappingType.SYMMETRIC), bits=tuple(range(2, 9)),
                doc="signed grid with an exact zero", param_names=frozenset({"step", "offset"})))  # fmt: skip
register(Scheme("ternary", lambda bits, opts: QuantSpec(bits, MappingType.TERNARY), bits=(2,),
                doc="{-α, 0, +α} with an L2-fitted threshold", param_names=frozenset({"alpha", "threshold"})))  # fmt: skip
register(Scheme("sign", lambda bits, opts: QuantSpec(bits, MappingType.SIGN), bits=(1,), doc="1 bit: α·sign(x), α = mean|x|",
                param_names=frozenset({"alpha"})))  # fmt: skip


def _group_encode(x: torch.Tensor, bits: int, opts: Options) -> Encoded:
    """The group scheme's encoder (its padding and its cap on absurd sizes are tested)."""
    return SCHEMES["group"].encode(x, bits, opts)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FP32 = struct.Struct("<f")


def decode_problem(name: str, bits: int, params: dict[str, float], aux: dict[str, torch.Tensor]) -> str | None:
    """Why stored codes could decode to NaN/Inf, or None: every parameter finite, every scale
    positive, and ``decoded_bound`` below fp32's largest value (the rule the pack reader
    applies, so what is written can be read). A few scalar operations (one per group)."""
    bad = next((k for k, v in params.items() if not math.isfinite(v)), None)
    if bad is not None:
        return f"{name} parameter {bad!r} is {params[bad]}"
    spec = SCHEMES[name].spec(bits, params)
    if spec.block_size is None:
        scale = {MappingType.ASYMMETRIC: "scale", MappingType.SYMMETRIC: "step"}.get(spec.mapping)
        if scale is not None and not _f32(params[scale]) > 0:
            return f"{name} parameter {scale!r} is {params[scale]}, not positive"
    elif not bool((aux["step"] >= 0).all()):
        return "a group step is negative or NaN"
    bound = decoded_bound(name, bits, params, aux)
    if not bound < FLOAT32_MAX:
        return f"its codes decode beyond float32 (up to {bound:g})"
    return None


def _f32(value: float) -> float:
    """``value`` as the fp32 number the decoders compute with (±inf when it does not fit);
    struct's conversion rounds like a cast and is cheap (called per manifest entry)."""
    try:
        return float(_FP32.unpack(_FP32.pack(value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


def decoded_bound(name: str, bits: int, params: dict[str, float], aux: dict[str, torch.Tensor]) -> float:
    """The largest |decoded value| over every code 0 … 2^b − 1, computed in fp64 from the fp32
    parameters: an upper bound of what the fp32 decoders produce."""
    top = 2**bits - 1
    spec = SCHEMES[name].spec(bits, params)
    if spec.block_size is not None:
        per_block = aux["lo"].double().abs() + aux["step"].double().abs() * top
        return float(per_block.max()) if per_block.numel() else 0.0
    if spec.mapping is MappingType.ASYMMETRIC:
        zp = _f32(params["zero_point"])
        return max(abs(zp), abs(top - zp)) / _f32(params["scale"])
    if spec.mapping is MappingType.SYMMETRIC:
        offset = _f32(params["offset"])
        return max(abs(offset), abs(top - offset)) * _f32(params["step"])
    return abs(_f32(params["alpha"]))  # ternary, sign: ±α (and 0)


def fake_quantize_with(x: torch.Tensor, scheme: str, bits: int, **opts: Any) -> torch.Tensor:
    """Encode then decode with any scheme (for error measurement and bit allocation)."""
    qp = choose_qparams(get_scheme(scheme, bits).spec(bits, opts), x.reshape(-1).float())
    return dequantize(quantize(x, qp), qp, tuple(x.shape))
