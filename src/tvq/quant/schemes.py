"""Quantization schemes: the paper's min-max and the better low-bit grids, one registry.

Each scheme turns an fp32 tensor into b-bit integer codes plus a few float parameters
(``params``, kept in the manifest) and optional per-group arrays (``aux``, stored next to
the codes). Storage layout (bit packing, files) is not this module's business.

* ``minmax``   the paper's per-tensor asymmetric min-max (bit-exact with its code).
* ``mse``      min-max on a clipped range [α·min, α·max], α chosen to minimise the L2 error.
* ``group``    asymmetric min-max per group of ``group_size`` consecutive elements.
* ``symmetric`` signed grid around an exact zero: step = max|x| / (2^(b-1) - 1).
* ``ternary``  {-α, 0, +α} (2-bit codes), threshold and α fitted to minimise the L2 error.
* ``sign``     1 bit: α·sign(x) with α = mean|x| (the L2-optimal scale for a sign code).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tvq.errors import ConfigError, EncodeError
from tvq.quant.minmax import (
    NOT_FINITE,
    minmax_dequantize,
    minmax_params,
    minmax_quantize,
)

_CHUNK = 1 << 24


@dataclass
class Encoded:
    codes: torch.Tensor  # flat uint8, values < 2^bits
    params: dict[str, float] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    constant: float | None = None  # the whole tensor equals this value: no codes stored


@dataclass(frozen=True)
class Scheme:
    name: str
    encode: Callable[[torch.Tensor, int, dict], Encoded]
    decode: Callable[[torch.Tensor, int, dict[str, float], dict[str, torch.Tensor]], torch.Tensor]
    bits: tuple[int, ...] = tuple(range(1, 9))
    doc: str = ""
    aux_names: tuple[str, ...] = ()
    param_names: frozenset[str] = frozenset()  # exactly the scalar parameters it stores


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


def _finite(value: float, problem: str = NOT_FINITE) -> float:
    """``value`` (a range end, a magnitude or a mean the encoder computed anyway), which must be
    finite: NaN/Inf there means NaN/Inf in the values, or a statistic overflowing fp32."""
    if not math.isfinite(value):
        raise EncodeError(problem)
    return value


def _constant(x: torch.Tensor) -> float | None:
    lo, hi = (_finite(float(v)) for v in torch.aminmax(x))
    return lo if lo == hi else None


# -- minmax (paper) -------------------------------------------------------------------------
def _minmax_encode(x: torch.Tensor, bits: int, opts: dict) -> Encoded:
    p = minmax_params(x, bits)
    if p.constant is not None:
        return Encoded(torch.empty(0, dtype=torch.uint8), constant=p.constant)
    return Encoded(minmax_quantize(x, p), {"scale": p.scale, "zero_point": p.zero_point})


def _affine_decode(codes: torch.Tensor, bits: int, params: dict[str, float], aux: dict) -> torch.Tensor:
    from tvq.quant.minmax import MinMaxParams

    return minmax_dequantize(codes, MinMaxParams(bits, params["scale"], params["zero_point"]), (codes.numel(),))


register(Scheme("minmax", _minmax_encode, _affine_decode, doc="paper: per-tensor asymmetric min-max", param_names=frozenset({"scale", "zero_point"})))


# -- mse-clipped min-max ----------------------------------------------------------------------
def _affine_from_range(lo: float, hi: float, bits: int) -> tuple[float, float]:
    scale = (2**bits - 1) / (hi - lo)
    return scale, -round(scale * lo)


def _affine_codes(x: torch.Tensor, bits: int, scale: float, zero_point: float) -> torch.Tensor:
    from tvq.quant.minmax import MinMaxParams

    return minmax_quantize(x, MinMaxParams(bits, scale, zero_point))


def _mse_encode(x: torch.Tensor, bits: int, opts: dict) -> Encoded:
    const = _constant(x)
    if const is not None:
        return Encoded(torch.empty(0, dtype=torch.uint8), constant=const)
    flat = x.reshape(-1).float()
    sample = flat
    if flat.numel() > (1 << 20):  # search the clip on a fixed, evenly spaced sample
        sample = flat[:: flat.numel() // (1 << 20)]
    lo, hi = float(flat.min()), float(flat.max())
    best = (float("inf"), 1.0)
    grid = opts.get("grid", 40)
    for i in range(grid):
        alpha = 1.0 - 0.9 * i / grid  # 1.0 down to 0.1
        a_lo, a_hi = alpha * lo, alpha * hi
        if a_hi <= a_lo:
            continue
        scale, zp = _affine_from_range(a_lo, a_hi, bits)
        deq = (torch.clamp(torch.round(sample * scale + zp), 0, 2**bits - 1) - zp) / scale
        err = float((deq - sample).pow(2).sum())
        if err < best[0]:
            best = (err, alpha)
    scale, zp = _affine_from_range(best[1] * lo, best[1] * hi, bits)
    scale = float(torch.tensor(scale, dtype=torch.float32))
    return Encoded(_affine_codes(flat, bits, scale, zp), {"scale": scale, "zero_point": float(zp), "clip": best[1]})


register(Scheme("mse", _mse_encode, _affine_decode, doc="min-max on an MSE-optimal clipped range", param_names=frozenset({"scale", "zero_point", "clip"})))


# -- group-wise min-max ---------------------------------------------------------------------
def _groups(flat: torch.Tensor, group_size: int) -> torch.Tensor:
    """``flat`` as rows of ``group_size``. A group larger than the tensor is the tensor (one
    group, the same codes and ranges as padding it would give): an absurd group size
    allocates nothing."""
    group_size = max(1, min(group_size, flat.numel()))
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])  # repeat the last value: range unchanged
    return flat.view(-1, group_size)


def _group_encode(x: torch.Tensor, bits: int, opts: dict) -> Encoded:
    group_size = int(opts.get("group_size", 128))
    const = _constant(x)
    if const is not None:
        return Encoded(torch.empty(0, dtype=torch.uint8), constant=const)
    flat = x.reshape(-1).float()
    g = _groups(flat, group_size)
    lo = g.min(dim=1).values
    step = (g.max(dim=1).values - lo) / (2**bits - 1)
    if not bool(torch.isfinite(step).all()):  # one value per group: cheap
        raise EncodeError("a group's range (max − min) overflows float32")
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.clamp(torch.round((g - lo[:, None]) / safe[:, None]), 0, 2**bits - 1).to(torch.uint8)
    return Encoded(codes.reshape(-1)[: flat.numel()].contiguous(), {"group_size": group_size}, {"lo": lo, "step": step})


def _group_decode(codes: torch.Tensor, bits: int, params: dict[str, float], aux: dict) -> torch.Tensor:
    group_size = int(params["group_size"])
    n = codes.numel()
    g = _groups(codes.to(torch.float32), group_size)
    return (aux["lo"][:, None] + g * aux["step"][:, None]).reshape(-1)[:n]


register(Scheme("group", _group_encode, _group_decode, doc="asymmetric min-max per group of group_size elements", aux_names=("lo", "step"), param_names=frozenset({"group_size"})))


# -- symmetric --------------------------------------------------------------------------------
def _symmetric_encode(x: torch.Tensor, bits: int, opts: dict) -> Encoded:
    flat = x.reshape(-1).float()
    amax = _finite(float(flat.abs().max()))
    if amax == 0:
        return Encoded(torch.empty(0, dtype=torch.uint8), constant=0.0)
    levels = 2 ** (bits - 1) - 1
    step = float(torch.tensor(amax / levels, dtype=torch.float32))
    codes = torch.clamp(torch.round(flat / step), -levels, levels) + levels
    return Encoded(codes.to(torch.uint8), {"step": step, "offset": levels})


def _symmetric_decode(codes: torch.Tensor, bits: int, params: dict[str, float], aux: dict) -> torch.Tensor:
    return (codes.to(torch.float32) - params["offset"]) * params["step"]


register(Scheme("symmetric", _symmetric_encode, _symmetric_decode, bits=tuple(range(2, 9)), doc="signed grid with an exact zero", param_names=frozenset({"step", "offset"})))


# -- ternary ----------------------------------------------------------------------------------
def _ternary_encode(x: torch.Tensor, bits: int, opts: dict) -> Encoded:
    flat = x.reshape(-1).float()
    mag = flat.abs()
    if _finite(float(mag.max())) == 0:
        return Encoded(torch.empty(0, dtype=torch.uint8), constant=0.0)
    sample = mag if mag.numel() <= (1 << 20) else mag[:: mag.numel() // (1 << 20)]
    best = (float("inf"), 0.0, 0.0)
    mean = float(sample.mean())
    for i in range(1, 31):  # threshold = t * mean|x|, t in (0, 1.5]; alpha = mean of kept |x|
        thr = mean * 0.05 * i
        kept = sample > thr
        if not bool(kept.any()):
            break
        alpha = float(sample[kept].mean())
        err = float(((sample - alpha).pow(2) * kept).sum() + (sample.pow(2) * ~kept).sum())
        if err < best[0]:
            best = (err, thr, alpha)
    _, thr, alpha = best
    codes = torch.where(flat > thr, 2, torch.where(flat < -thr, 0, 1)).to(torch.uint8)
    return Encoded(codes, {"alpha": alpha, "threshold": thr})


def _ternary_decode(codes: torch.Tensor, bits: int, params: dict[str, float], aux: dict) -> torch.Tensor:
    return (codes.to(torch.float32) - 1) * params["alpha"]


register(Scheme("ternary", _ternary_encode, _ternary_decode, bits=(2,), doc="{-α, 0, +α} with an L2-fitted threshold", param_names=frozenset({"alpha", "threshold"})))


# -- sign -------------------------------------------------------------------------------------
def _sign_encode(x: torch.Tensor, bits: int, opts: dict) -> Encoded:
    flat = x.reshape(-1).float()
    alpha = _finite(float(flat.abs().mean()), "values are not finite in float32, or their mean magnitude overflows it")
    if alpha == 0:
        return Encoded(torch.empty(0, dtype=torch.uint8), constant=0.0)
    return Encoded((flat > 0).to(torch.uint8), {"alpha": alpha})


def _sign_decode(codes: torch.Tensor, bits: int, params: dict[str, float], aux: dict) -> torch.Tensor:
    return (codes.to(torch.float32) * 2 - 1) * params["alpha"]


register(Scheme("sign", _sign_encode, _sign_decode, bits=(1,), doc="1 bit: α·sign(x), α = mean|x|", param_names=frozenset({"alpha"})))


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FP32 = struct.Struct("<f")


def decode_problem(name: str, bits: int, params: dict[str, float], aux: dict[str, torch.Tensor]) -> str | None:
    """Why stored codes could decode to NaN/Inf, or None: every parameter finite, every scale
    positive, and ``decoded_bound`` below fp32's largest value (the rule the pack reader
    applies, so what is written can be read). A few scalar operations (one per group)."""
    bad = next((k for k, v in params.items() if not math.isfinite(v)), None)
    if bad is not None:
        return f"{name} parameter {bad!r} is {params[bad]}"
    scale = {"minmax": "scale", "mse": "scale", "symmetric": "step"}.get(name)
    if scale is not None and not _f32(params[scale]) > 0:
        return f"{name} parameter {scale!r} is {params[scale]}, not positive"
    if name == "group" and not bool((aux["step"] >= 0).all()):
        return "a group step is negative or NaN"
    bound = decoded_bound(name, bits, params, aux)
    if not bound < FLOAT32_MAX:
        return f"its codes decode beyond float32 (up to {bound:g})"
    return None


def _f32(value: float) -> float:
    """``value`` as the fp32 number the decoders compute with (±inf when it does not fit);
    struct's conversion rounds like a cast and is cheap (called per manifest entry)."""
    try:
        return _FP32.unpack(_FP32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def decoded_bound(name: str, bits: int, params: dict[str, float], aux: dict[str, torch.Tensor]) -> float:
    """The largest |decoded value| over every code 0 … 2^b − 1, computed in fp64 from the fp32
    parameters: an upper bound of what the fp32 decoders produce."""
    top = 2**bits - 1
    if name in ("minmax", "mse"):
        zp = _f32(params["zero_point"])
        return max(abs(zp), abs(top - zp)) / _f32(params["scale"])
    if name == "symmetric":
        offset = _f32(params["offset"])
        return max(abs(offset), abs(top - offset)) * _f32(params["step"])
    if name == "group":
        per_group = aux["lo"].double().abs() + aux["step"].double().abs() * top
        return float(per_group.max()) if per_group.numel() else 0.0
    return abs(_f32(params["alpha"]))  # ternary, sign: ±α (and 0)


def fake_quantize_with(x: torch.Tensor, scheme: str, bits: int, **opts) -> torch.Tensor:
    """Encode then decode with any scheme (for error measurement and bit allocation)."""
    s = get_scheme(scheme, bits)
    enc = s.encode(x.float(), bits, opts)
    if enc.constant is not None:
        return torch.full(x.shape, enc.constant, dtype=torch.float32)
    return s.decode(enc.codes, bits, enc.params, enc.aux).reshape(x.shape)
