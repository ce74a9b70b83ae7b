"""The error model's passes, compiled: a tensor's range and its bins, from the stored inputs.

The bit allocation's analysis summarises every quantized tensor of every task (``tvq.quant.
error_model``): its range, then a histogram of (a sample of) its values. In torch that is a
pass forming x = θ_t − θ_pre in fp32 and several more per value (subtract the low end, scale,
clamp, convert to int32, ``bincount``). Here ``_range`` forms x from the bf16 or fp32 inputs a
block at a time and keeps min and max; ``_count_inputs`` forms x again and counts its bin, x
never stored; ``_count`` bins values already formed. Every fp32 operation is torch's, in its
order and without fused multiply-add (numba's default, no ``fastmath``; only the min/max loop
allows ``nnan``/``nsz``, and a non-finite value or a zero at either end is left to torch): the
bin of x is ⌊clamp((x − lo₃₂) · inv₃₂, 0, bins − 1)⌋, where lo₃₂ and inv₃₂ are the fp32
roundings of the scalars (as torch rounds a Python float operand of an fp32 tensor). So the
numbers are torch's to the bit (``tests/test_budget_streamed.py``). Without numba, or with
``TVQ_HISTOGRAM_KERNEL=torch``, callers take the torch path.

Jitted on first use (importing numba costs ~0.3 s, compiling a few seconds once per install:
the machine code is cached on disk where that is writable), single-threaded and ``nogil``: the
analysis runs tensors on several threads at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

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
    """(min, max) of a block with ``lo`` and ``hi``, vectorized (compiled with ``nnan`` and ``nsz``:
    a NaN or a zero's sign may be lost here; ``_finite`` and the caller see to those)."""
    for i in range(m):
        lo = min(lo, x[i])
        hi = max(hi, x[i])
    return lo, hi


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


# callees first: a caller compiled later sees them jitted (numba calls jitted functions only)
_KERNELS: dict[str, tuple[str, ...]] = {"count": ("_count",), "range": ("_load", "_block", "_extent", "_finite", "_range"),
                                        "count_inputs": ("_load", "_block", "_count_inputs")}  # fmt: skip
_FASTMATH = {"_extent": {"nnan", "nsz"}}


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
                for callee in _KERNELS[name]:
                    if not hasattr(module[callee], "py_func"):  # not jitted yet
                        module[callee] = _jit(numba, module[callee], _FASTMATH.get(callee))
                _jitted[name] = module[_KERNELS[name][-1]]
    kernel = _jitted[name]
    return None if kernel is _missing else kernel


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
