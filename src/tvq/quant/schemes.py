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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tvq.errors import ConfigError
from tvq.quant.minmax import minmax_dequantize, minmax_params, minmax_quantize

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


def _constant(x: torch.Tensor) -> float | None:
    lo, hi = x.min(), x.max()
    return float(lo) if bool(lo == hi) else None


# -- minmax (paper) -------------------------------------------------------------------------
def _minmax_encode(x: torch.Tensor, bits: int, opts: dict) -> Encoded:
    p = minmax_params(x, bits)
    if p.constant is not None:
        return Encoded(torch.empty(0, dtype=torch.uint8), constant=p.constant)
    return Encoded(minmax_quantize(x, p), {"scale": p.scale, "zero_point": p.zero_point})


def _affine_decode(codes: torch.Tensor, bits: int, params: dict[str, float], aux: dict) -> torch.Tensor:
    from tvq.quant.minmax import MinMaxParams

    return minmax_dequantize(codes, MinMaxParams(bits, params["scale"], params["zero_point"]), (codes.numel(),))


register(Scheme("minmax", _minmax_encode, _affine_decode, doc="paper: per-tensor asymmetric min-max"))


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


register(Scheme("mse", _mse_encode, _affine_decode, doc="min-max on an MSE-optimal clipped range"))


# -- group-wise min-max ---------------------------------------------------------------------
def _groups(flat: torch.Tensor, group_size: int) -> torch.Tensor:
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
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.clamp(torch.round((g - lo[:, None]) / safe[:, None]), 0, 2**bits - 1).to(torch.uint8)
    return Encoded(codes.reshape(-1)[: flat.numel()].contiguous(), {"group_size": group_size}, {"lo": lo, "step": step})


def _group_decode(codes: torch.Tensor, bits: int, params: dict[str, float], aux: dict) -> torch.Tensor:
    group_size = int(params["group_size"])
    n = codes.numel()
    g = _groups(codes.to(torch.float32), group_size)
    return (aux["lo"][:, None] + g * aux["step"][:, None]).reshape(-1)[:n]


register(Scheme("group", _group_encode, _group_decode, doc="asymmetric min-max per group of group_size elements", aux_names=("lo", "step")))


# -- symmetric --------------------------------------------------------------------------------
def _symmetric_encode(x: torch.Tensor, bits: int, opts: dict) -> Encoded:
    flat = x.reshape(-1).float()
    amax = float(flat.abs().max())
    if amax == 0:
        return Encoded(torch.empty(0, dtype=torch.uint8), constant=0.0)
    levels = 2 ** (bits - 1) - 1
    step = float(torch.tensor(amax / levels, dtype=torch.float32))
    codes = torch.clamp(torch.round(flat / step), -levels, levels) + levels
    return Encoded(codes.to(torch.uint8), {"step": step, "offset": levels})


def _symmetric_decode(codes: torch.Tensor, bits: int, params: dict[str, float], aux: dict) -> torch.Tensor:
    return (codes.to(torch.float32) - params["offset"]) * params["step"]


register(Scheme("symmetric", _symmetric_encode, _symmetric_decode, bits=tuple(range(2, 9)), doc="signed grid with an exact zero"))


# -- ternary ----------------------------------------------------------------------------------
def _ternary_encode(x: torch.Tensor, bits: int, opts: dict) -> Encoded:
    flat = x.reshape(-1).float()
    mag = flat.abs()
    if float(mag.max()) == 0:
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


register(Scheme("ternary", _ternary_encode, _ternary_decode, bits=(2,), doc="{-α, 0, +α} with an L2-fitted threshold"))


# -- sign -------------------------------------------------------------------------------------
def _sign_encode(x: torch.Tensor, bits: int, opts: dict) -> Encoded:
    flat = x.reshape(-1).float()
    alpha = float(flat.abs().mean())
    if alpha == 0:
        return Encoded(torch.empty(0, dtype=torch.uint8), constant=0.0)
    return Encoded((flat > 0).to(torch.uint8), {"alpha": alpha})


def _sign_decode(codes: torch.Tensor, bits: int, params: dict[str, float], aux: dict) -> torch.Tensor:
    return (codes.to(torch.float32) * 2 - 1) * params["alpha"]


register(Scheme("sign", _sign_encode, _sign_decode, bits=(1,), doc="1 bit: α·sign(x), α = mean|x|"))


def fake_quantize_with(x: torch.Tensor, scheme: str, bits: int, **opts) -> torch.Tensor:
    """Encode then decode with any scheme (for error measurement and bit allocation)."""
    s = get_scheme(scheme, bits)
    enc = s.encode(x.float(), bits, opts)
    if enc.constant is not None:
        return torch.full(x.shape, enc.constant, dtype=torch.float32)
    return s.decode(enc.codes, bits, enc.params, enc.aux).reshape(x.shape)
