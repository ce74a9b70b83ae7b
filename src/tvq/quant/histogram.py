"""The error model's passes, compiled: a tensor's range and its bins, from the stored inputs.

The bit allocation's analysis summarises every quantized tensor of every task (``tvq.quant.
error_model``): its range, then a histogram of (a sample of) its values. In torch that is a
pass forming x = θ_t − θ_pre in fp32 and several more per value (subtract the low end, scale,
clamp, convert to int32, ``bincount``). Here ``_range`` forms x from the bf16 or fp32 inputs a
block at a time and keeps min and max; ``_count_inputs`` forms x again and counts its bin, x
never stored; ``_count`` bins values already formed. Every fp32 operation is torch's, in its
order and without fused multiply-add (numba's default, no ``fastmath``; min and max compare
integer order keys of the values, and a non-finite value or a zero at either end is left to torch): the
bin of x is ⌊clamp((x − lo₃₂) · inv₃₂, 0, bins − 1)⌋, where lo₃₂ and inv₃₂ are the fp32
roundings of the scalars (as torch rounds a Python float operand of an fp32 tensor). So the
numbers are torch's to the bit (``tests/test_budget_streamed.py``). RTVQ with error
correction prices every task's offsets τ_t − β̂ at every base width: ``_beta`` forms β (the
mean, as ``tvq.quant.chunks.Mean``), ``_offset_ranges`` ranges all of them in one pass with each
β̂ formed a block at a time, and ``_offset_counts`` bins their sample. Without numba, or with
``TVQ_HISTOGRAM_KERNEL=torch``, callers take the torch path.

Jitted on first use (importing numba costs ~0.3 s, compiling a few seconds once per install:
the machine code is cached on disk where that is writable), single-threaded and ``nogil``: the
analysis runs tensors on several threads at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, cast

import numpy as np

ENV = "TVQ_HISTOGRAM_KERNEL"  # "torch": the reference path only (tests, comparisons)
MIN_ELEMENTS = 1 << 14  # fewer values take the torch path: a small model's analysis never imports numba


def _count(x: np.ndarray, lo: np.float32, inv: np.float32, top: np.float32, counts: np.ndarray) -> None:
    """``counts[bin(v)] += 1`` for every fp32 value v of ``x`` (contiguous)."""
    zero = np.float32(0.0)
    for i in range(x.shape[0]):
        v = (x[i] - lo) * inv
        v = min(max(v, zero), top)
        counts[np.int64(v)] += 1


BLOCK = 4096  # elements converted per block: the fp32 operands stay in L1
ROUNDER = np.float32(1.5 * 2**23)  # x + ROUNDER − ROUNDER rounds x (|x| < 2^22) to the nearest integer, ties to even


def _load(src: np.ndarray, bf16: bool, out: np.ndarray) -> None:
    """``out[:len(src)]`` = ``src`` in fp32, exactly: bf16 (its bits as uint16) is the high half of an fp32."""
    if bf16:
        bits = out.view(np.uint32)
        for i in range(src.shape[0]):
            bits[i] = np.uint32(src[i]) << np.uint32(16)
    else:
        for i in range(src.shape[0]):
            out[i] = src[i]


def _block(theta: np.ndarray, pre: np.ndarray, bf16: bool, has_pre: bool, start: int, m: int, x: np.ndarray, p: np.ndarray) -> None:
    """x = θ − θ_pre (or θ) in fp32 for the block ``start … start+m``, into ``x[:m]``."""
    _load(theta[start : start + m], bf16, x)
    if has_pre:
        _load(pre[start : start + m], bf16, p)
        for i in range(m):
            x[i] = x[i] - p[i]


def _extent(x: np.ndarray, m: int, lo: np.float32, hi: np.float32) -> tuple[np.float32, np.float32]:
    """(min, max) of a block with ``lo`` and ``hi``, by order keys (``_key``: integer min and max
    vectorize, float ones do not here). Exact for every value but NaN and a zero's sign, which
    ``_finite`` and the caller see to (a NaN has a key too, so it goes unnoticed here)."""
    low, high = _key(lo), _key(hi)
    for i in range(m):
        k = _key(x[i])
        low = min(low, k)
        high = max(high, k)
    return _unkey(low), _unkey(high)


def _f32_bits(v: np.float32) -> np.int32:
    """The bits of an fp32 value as an int32 (compiled: one LLVM bitcast, ``_bitcast_intrinsic``)."""
    return np.array([v], np.float32).view(np.int32)[0]


_f32_bits_python = _f32_bits


def _key(v: np.float32) -> np.int32:
    """An int32 ordered as the fp32 values are (−0 just below +0): the bits, the magnitude's flipped when negative."""
    b = _f32_bits(v)
    return b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))


def _unkey(k: np.int32) -> np.float32:
    """The fp32 value of an order key (``_key`` is its own inverse on the bits)."""
    b = k ^ ((k >> np.int32(31)) & np.int32(0x7FFFFFFF))
    return np.array([b], np.int32).view(np.float32)[0]


def _finite(bits: np.ndarray, m: int) -> bool:
    """Whether no element of a block is ±Inf or NaN, from its bits."""
    exponent = np.uint32(0x7F800000)
    bad = np.uint32(0)
    for i in range(m):
        bad |= np.uint32((bits[i] & exponent) == exponent)
    return bad == 0


def _range(theta: np.ndarray, pre: np.ndarray, bf16: bool, has_pre: bool) -> tuple[float, float, bool]:
    """(min, max, plain) of x = θ − θ_pre (or θ) in fp32, θ and θ_pre both bf16 (``bf16``) or
    both fp32; ``plain``: every x finite and neither end zero (else the caller asks torch, which
    names a non-finite value and settles the sign of a zero end as torch does)."""
    n = theta.shape[0]
    x = np.empty(BLOCK, np.float32)
    p = np.empty(BLOCK, np.float32)
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    finite = True
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        _block(theta, pre, bf16, has_pre, start, m, x, p)
        finite = finite and _finite(x.view(np.uint32), m)
        lo, hi = _extent(x, m, lo, hi)
    return float(lo), float(hi), finite and n > 0 and lo != 0 and hi != 0


def _count_inputs(theta: np.ndarray, pre: np.ndarray, bf16: bool, has_pre: bool, step: int, lo: np.float32, inv: np.float32,
                  top: np.float32, counts: np.ndarray) -> None:  # fmt: skip
    """``_count`` of x = θ − θ_pre (or θ) at 0, step, 2·step, … formed from the inputs as it goes."""
    n = theta.shape[0]
    zero = np.float32(0.0)
    x = np.empty(BLOCK, np.float32)
    p = np.empty(BLOCK, np.float32)
    if step == 1:
        for start in range(0, n, BLOCK):
            m = min(BLOCK, n - start)
            _block(theta, pre, bf16, has_pre, start, m, x, p)
            for i in range(m):
                v = (x[i] - lo) * inv
                v = min(max(v, zero), top)
                counts[np.int64(v)] += 1
        return
    if step <= 4:  # a dense sample: blocks converted whole (vectorized), every step-th element counted
        nxt = 0
        for start in range(0, n, BLOCK):
            m = min(BLOCK, n - start)
            _block(theta, pre, bf16, has_pre, start, m, x, p)
            for i in range(nxt - start, m, step):
                v = (x[i] - lo) * inv
                v = min(max(v, zero), top)
                counts[np.int64(v)] += 1
            nxt = start + m + (nxt - start - m) % step
        return
    tbits = x.view(np.uint32)
    pbits = p.view(np.uint32)
    p[0] = zero
    for k in range(0, n, step):  # a sparse sample: one element at a time, converted as ``_load`` does
        if bf16:
            tbits[0] = np.uint32(theta[k]) << np.uint32(16)
            if has_pre:
                pbits[0] = np.uint32(pre[k]) << np.uint32(16)
        else:
            x[0] = theta[k]
            if has_pre:
                p[0] = pre[k]
        v = ((x[0] - p[0] if has_pre else x[0]) - lo) * inv
        v = min(max(v, zero), top)
        counts[np.int64(v)] += 1


def _base_block(beta: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: np.ndarray, mode: np.ndarray, m: int,
                hats: np.ndarray) -> None:  # fmt: skip
    """``hats[k, :m]`` = β̂ of the base grid k for the block ``beta[:m]``: the codes
    clamp(round(β·scale + zero_point), 0, qmax), then (code − zero_point) / scale, each fp32 op
    torch's (``tvq.quant.affine.quantize_into``, ``dequantize_``; clamping before rounding to
    even changes no code, and a code's zero sign no offset's value). ``mode[k]``: 0 that grid,
    1 β itself (a constant base), 2 zero (so the "offsets" are the task vectors themselves)."""
    zero32 = np.float32(0.0)
    for k in range(scale.shape[0]):
        h = hats[k]
        if mode[k] == 1:
            for i in range(m):
                h[i] = beta[i]
            continue
        if mode[k] == 2:
            for i in range(m):
                h[i] = zero32
            continue
        s, z, top = scale[k], zero[k], qmax[k]
        for i in range(m):  # clamped first, then rounded half to even by adding and taking 1.5·2^23 (vectorizes; rint does not)
            q = min(max(beta[i] * s + z, zero32), top)
            q = (q + ROUNDER) - ROUNDER
            h[i] = (q - z) / s


def _beta(thetas: Any, pre: np.ndarray, bf16: bool, beta: np.ndarray) -> tuple[bool, bool]:
    """β = (Σ_t θ_t) / T − θ_pre in fp32, summed in order from zero (``tvq.quant.chunks.Mean``,
    then the subtraction), into ``beta``; (whether every θ_t equals θ_0, as ``torch.equal``:
    the caller then takes β = θ_0 − θ_pre, as ``Mean`` does; whether every β is finite)."""
    n = pre.shape[0]
    tasks = len(thetas)
    divisor = np.float32(tasks)
    x = np.empty(BLOCK, np.float32)
    x0 = np.empty(BLOCK, np.float32)
    p = np.empty(BLOCK, np.float32)
    same = True
    finite = True
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        out = beta[start : start + m]
        _load(thetas[0][start : start + m], bf16, x0)
        for i in range(m):
            out[i] = np.float32(0.0) + x0[i]
        for t in range(1, tasks):
            _load(thetas[t][start : start + m], bf16, x)
            differs = False
            for i in range(m):
                out[i] = out[i] + x[i]
                differs |= x[i] != x0[i]
            same = same and not differs
        _load(pre[start : start + m], bf16, p)
        for i in range(m):
            out[i] = out[i] / divisor
        for i in range(m):
            out[i] = out[i] - p[i]
        finite = finite and _finite(out.view(np.uint32), m)
    return same, finite


def _extent_of_difference(x: np.ndarray, h: np.ndarray, m: int, lo: np.float32, hi: np.float32) -> tuple[np.float32, np.float32]:
    """(min, max) of x − h over a block with ``lo`` and ``hi`` (``_extent``), the difference never stored."""
    low, high = _key(lo), _key(hi)
    for i in range(m):
        k = _key(x[i] - h[i])
        low = min(low, k)
        high = max(high, k)
    return _unkey(low), _unkey(high)


def _offset_ranges(thetas: Any, pre: np.ndarray, bf16: bool, beta: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                   qmax: np.ndarray, mode: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:  # fmt: skip
    """``lo[k, t]``, ``hi[k, t]``: the range of (θ_t − θ_pre) − β̂_k in fp32 for every grid k
    (``_base_block``) and task t, in one pass over the inputs (β̂_k formed a block at a time,
    never stored). A NaN or an infinity in them always lands at an end (``_key``), so the caller
    sees it there, and judges zero ends."""
    n = pre.shape[0]
    grids = scale.shape[0]
    x = np.empty(BLOCK, np.float32)
    p = np.empty(BLOCK, np.float32)
    hats = np.empty((grids, BLOCK), np.float32)
    lo[:, :] = np.inf
    hi[:, :] = -np.inf
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        _base_block(beta[start : start + m], scale, zero, qmax, mode, m, hats)
        _load(pre[start : start + m], bf16, p)
        for t in range(len(thetas)):
            _load(thetas[t][start : start + m], bf16, x)
            for i in range(m):
                x[i] = x[i] - p[i]
            for k in range(grids):
                lo[k, t], hi[k, t] = _extent_of_difference(x, hats[k], m, lo[k, t], hi[k, t])


def _offset_counts(thetas: Any, pre: np.ndarray, bf16: bool, beta: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                   qmax: np.ndarray, mode: np.ndarray, step: int, lo: np.ndarray, inv: np.ndarray, top: np.float32,
                   counts: np.ndarray, taus: np.ndarray, betas: np.ndarray, hat: np.ndarray) -> None:  # fmt: skip
    """``counts[k, t]``: the bins (``_count``'s, with ``lo[k, t]`` and ``inv[k, t]``) of the offsets
    (θ_t − θ_pre) − β̂_k at elements 0, step, 2·step, …: the sample of every τ_t and of β gathered
    once (into ``taus``, ``betas``; ``hat`` holds one β̂_k at a time), then one histogram at a time."""
    grids = scale.shape[0]
    sampled = betas.shape[0]
    zero32 = np.float32(0.0)
    p = np.empty(BLOCK, np.float32)
    pbits = p.view(np.uint32)
    for s0 in range(0, sampled, BLOCK):
        m = min(BLOCK, sampled - s0)
        for i in range(m):
            betas[s0 + i] = beta[(s0 + i) * step]
            if bf16:
                pbits[i] = np.uint32(pre[(s0 + i) * step]) << np.uint32(16)
            else:
                p[i] = pre[(s0 + i) * step]
        for t in range(len(thetas)):
            theta = thetas[t]
            out = taus[t, s0 : s0 + m]
            if bf16:
                bits = out.view(np.uint32)
                for i in range(m):
                    bits[i] = np.uint32(theta[(s0 + i) * step]) << np.uint32(16)
            else:
                for i in range(m):
                    out[i] = theta[(s0 + i) * step]
            for i in range(m):
                out[i] = out[i] - p[i]
    for k in range(grids):
        _base_block(betas, scale[k : k + 1], zero[k : k + 1], qmax[k : k + 1], mode[k : k + 1], sampled, hat.reshape(1, -1))
        for t in range(len(thetas)):
            c = counts[k, t]
            low, scaling = lo[k, t], inv[k, t]
            x = taus[t]
            for i in range(sampled):
                v = ((x[i] - hat[i]) - low) * scaling
                v = min(max(v, zero32), top)
                c[np.int64(v)] += 1


_lock = threading.Lock()
_jitted: dict[str, Callable[..., Any]] = {}


def counter(n: int) -> Callable[[np.ndarray, np.float32, np.float32, np.float32, np.ndarray], None] | None:
    """The compiled counting loop for a part of ``n`` values, or None: numba missing, the kernel
    turned off (``TVQ_HISTOGRAM_KERNEL=torch``), or too few values to be worth it."""
    return _kernel("count", _count, n)


def input_kernels(n: int) -> tuple[Callable[..., tuple[float, float, bool]], Callable[..., None]] | None:
    """The compiled passes over the stored inputs (``_range``, then ``_count_inputs``), or None (as :func:`counter`)."""
    ranger, count = _kernel("range", _range, n), _kernel("count_inputs", _count_inputs, n)
    return None if ranger is None or count is None else (ranger, count)


def offset_kernels(n: int) -> tuple[Callable[..., tuple[bool, bool]], Callable[..., None], Callable[..., None]] | None:
    """The compiled passes of RTVQ's error-corrected offsets (``_beta``, ``_offset_ranges``,
    ``_offset_counts``), or None (as :func:`counter`)."""
    found = (_kernel("beta", _beta, n), _kernel("offset_ranges", _offset_ranges, n), _kernel("offset_counts", _offset_counts, n))
    return None if any(k is None for k in found) else found  # type: ignore[return-value]


# callees first: a caller compiled later sees them jitted (numba calls jitted functions only)
_KERNELS: dict[str, tuple[str, ...]] = {"count": ("_count",), "range": ("_load", "_block", "_key", "_unkey", "_extent", "_finite", "_range"),
                                        "count_inputs": ("_load", "_block", "_count_inputs"), "beta": ("_load", "_finite", "_beta"),
                                        "offset_ranges": ("_load", "_key", "_unkey", "_extent", "_extent_of_difference", "_base_block",
                                                          "_offset_ranges"),
                                        "offset_counts": ("_base_block", "_offset_counts")}  # fmt: skip


def _kernel(name: str, fn: Callable[..., Any], n: int) -> Callable[..., Any] | None:
    if n < MIN_ELEMENTS or os.environ.get(ENV, "numba") == "torch":
        return None
    with _lock:
        if name not in _jitted:
            try:
                import numba
            except ImportError:
                _jitted[name] = _missing
            else:
                module = globals()
                if module["_f32_bits"] is _f32_bits_python:  # the compiled loops call the intrinsic
                    module["_f32_bits"] = _bitcast_intrinsic()
                for callee in _KERNELS[name]:
                    if not hasattr(module[callee], "py_func"):  # not jitted yet
                        module[callee] = _jit(numba, module[callee])
                _jitted[name] = module[_KERNELS[name][-1]]
    kernel = _jitted[name]
    return None if kernel is _missing else kernel


def _bitcast_intrinsic() -> Callable[..., Any]:
    """``_f32_bits`` for compiled code: the fp32 value's bits reinterpreted as an int32, in register
    (a bitcast; the loops that use it vectorize, where going through memory halves their speed)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def f32_bits(typingctx: Any, value: Any) -> Any:
        if value != types.float32:
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.IntType(32))

        return types.int32(types.float32), codegen

    return cast(Callable[..., Any], f32_bits)


def _missing(*args: object) -> None:  # pragma: no cover - a marker, never called
    raise RuntimeError("numba is not installed")


def _jit(numba: Any, fn: Callable[..., Any], fastmath: set[str] | None = None) -> Callable[..., Any]:
    """``fn`` compiled (strict IEEE arithmetic unless ``fastmath`` flags are given), its machine
    code cached on disk where a cache location is writable."""
    flags = {"nogil": True, "fastmath": fastmath or False}
    try:
        return numba.njit(cache=True, **flags)(fn)
    except Exception:  # noqa: BLE001 -- no writable cache: compile once per process instead
        return numba.njit(**flags)(fn)
