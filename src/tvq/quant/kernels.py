"""Compiled CPU kernels of the paper's per-tensor min–max quantizer (numba), fused over the inputs.

The torch path (tvq.quant.fused over chunk sources) makes ~15 passes over every chunk of every
task: θ_t and θ_pre converted to fp32, τ_t formed twice (once per pass), scaled, rounded,
clamped, packed, dequantized, differenced and dotted. Here each pass is one loop over blocks
that live in L1: **range** reads θ_t and θ_pre as stored (bf16, fp16, fp32), forms
x = θ_t − ref and tracks min, max and the first non-finite element; **encode** forms x again,
quantizes, bit-packs, dequantizes (into ``recon`` when asked) and sums the error statistics.

Every fp32 operation is the torch path's, in its order, without fused multiply-add or
reassociation (numba's default, no ``fastmath``): τ = θ32 − (β̂ + θ_pre32), q = clamp(rint(x·scale +
zp), 0, 2^b − 1), x̂ = (q − zp)/scale. So codes, packed bytes and reconstructions are the torch
path's to the bit. Only the error statistics differ: the torch path sums fp32 dot products per
chunk (MKL's, each off by up to ~3e-6 relative on 1 Mi elements), these sum exact fp64 squares;
a manifest's rel_error then differs in the sixth digit at most (measured ≤ 1e-5 relative,
docs/llm-benchmark.md), as the GPU path's may (README, "A GPU").

The functions below are plain Python until :func:`compiled` jits them in place: importing numba
takes ~0.3 s, which only a quantize of large tensors on the CPU should pay. Each is compiled single-threaded
and releases the GIL (``nogil``): tvq already runs tensors on several threads at once (the
local executor), so the kernels run in parallel without numba's own thread pool (whose
default layer may not be entered from two threads at once). Machine code is cached on disk
(``cache=True``: beside this file, else numba's user cache or ``NUMBA_CACHE_DIR``); where no
cache location is writable it is compiled once per process instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tvq.errors import EncodeError
from tvq.quant.affine import NOT_FINITE, MappingType, QuantSpec, params_from_minmax
from tvq.quant.chunks import CHUNK
from tvq.quant.fused import QuantResult
from tvq.quant.packing import packed_nbytes

F32, BF16, F16 = 0, 1, 2  # how an input's elements are stored (``kind``)
KINDS = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}
BLOCK = 4096  # elements per block: its fp32 operands stay in L1; a multiple of 8, so packed codes start on a byte
HAS_PRE, HAS_HAT, REF_TAU, STATS = 1, 2, 4, 8  # ``mode`` flags
ENV = "TVQ_QUANT_KERNEL"  # "torch": the reference path only (tests, comparisons)
# Smaller tensors take the torch path: there they cost about the same, and a small model's
# quantize then neither imports numba (~0.3 s) nor compiles the kernels (~3-6 CPU s, once per install).
MIN_ELEMENTS = 1 << 16


def _load(src, kind, table, start, m, out):
    """``out[:m]`` = elements ``start … start+m`` of ``src`` (an input's bytes) in fp32, exactly:
    bf16 is the high half of an fp32, fp16 goes through the 65 536-entry table torch's
    conversion made. (Blocks are sliced first and indexed from 0: an offset index keeps a loop
    from vectorizing, 10x slower.)"""
    if kind == F32:
        f = src[start * 4 : (start + m) * 4].view(np.float32)
        for i in range(m):
            out[i] = f[i]
    elif kind == BF16:
        h = src[start * 2 : (start + m) * 2].view(np.uint16)
        bits = out.view(np.uint32)
        for i in range(m):
            bits[i] = np.uint32(h[i]) << np.uint32(16)
    else:
        h = src[start * 2 : (start + m) * 2].view(np.uint16)
        for i in range(m):
            out[i] = table[np.int64(h[i])]


def _reference(pre, pkind, hat, mode, table, start, m, pbuf, rbuf):
    """θ_pre32 of one block into ``pbuf`` and the reference every task subtracts into ``rbuf``:
    β̂ + θ_pre32 (HAS_HAT) or θ_pre32; once per block, whatever the number of tasks."""
    if mode & HAS_PRE:
        _load(pre, pkind, table, start, m, pbuf)
        if mode & HAS_HAT:
            h = hat[start : start + m]
            for i in range(m):
                rbuf[i] = h[i] + pbuf[i]
        else:
            for i in range(m):
                rbuf[i] = pbuf[i]


def _difference(theta, tkind, mode, table, start, m, tbuf, rbuf, xbuf):
    """θ32 of one block into ``tbuf`` and x = θ32 − ref into ``xbuf`` (x = θ32 without HAS_PRE)."""
    _load(theta, tkind, table, start, m, tbuf)
    if mode & HAS_PRE:
        for i in range(m):
            xbuf[i] = tbuf[i] - rbuf[i]
    else:
        for i in range(m):
            xbuf[i] = tbuf[i]


def _slot(a0, a1, a2, a3, j):
    """Task ``j`` (0-3) of a call's four slots (numba passes no list of arrays without a costly conversion)."""
    return a0 if j == 0 else a1 if j == 1 else a2 if j == 2 else a3


def _extent(xbits, m, klo, khi):
    """(min, max) of a block as order keys (fp32 bits made monotone as signed integers: integer
    min and max vectorize, float ones do not here; −0 sorts below +0 and the caller settles
    which zero), whether an element is ±Inf or NaN and whether one is −0, all from the bits."""
    flip = np.int32(0x7FFFFFFF)
    sign = np.int32(31)
    exponent = np.int32(0x7F800000)
    negative_zero = np.int32(-0x80000000)
    bad = np.int32(0)
    negzero = np.int32(0)
    for i in range(m):
        b = xbits[i]
        k = b ^ ((b >> sign) & flip)
        klo = min(klo, k)
        khi = max(khi, k)
        bad |= np.int32((b & exponent) == exponent)
        negzero |= np.int32(b == negative_zero)
    return klo, khi, bad != 0, negzero != 0


def _range(a0, a1, a2, a3, kinds, n, pre, pkind, hat, mode, table, lo, hi, first_bad, negzero):
    """Into ``lo``, ``hi``, ``first_bad``, ``negzero`` (one entry per task): the min, max, index of
    the first non-finite x (−1: none) and whether some x is −0 of each of up to 4 tasks' x over
    the ``n`` elements, θ_pre and β̂ read once per block for all of them; a zero end's sign is
    arbitrary (the caller settles it)."""
    tasks = kinds.size
    tbuf = np.empty(BLOCK, np.float32)
    pbuf = np.empty(BLOCK, np.float32)
    rbuf = np.empty(BLOCK, np.float32)
    xbuf = np.empty(BLOCK, np.float32)
    xbits = xbuf.view(np.int32)
    klo = np.full(tasks, 0x7F800000, np.int64)  # the order keys of +Inf and −Inf
    khi = np.full(tasks, -0x7F800001, np.int64)
    for j in range(tasks):
        first_bad[j] = -1
        negzero[j] = False
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        _reference(pre, pkind, hat, mode, table, start, m, pbuf, rbuf)
        for j in range(tasks):
            _difference(_slot(a0, a1, a2, a3, j), kinds[j], mode, table, start, m, tbuf, rbuf, xbuf)
            klo[j], khi[j], bad, nz = _extent(xbits, m, klo[j], khi[j])
            negzero[j] |= nz
            if bad and first_bad[j] < 0:
                for i in range(m):
                    if (xbits[i] & np.int32(0x7F800000)) == np.int32(0x7F800000):
                        first_bad[j] = start + i
                        break
    keys = klo.astype(np.int32)
    lo[:tasks] = (keys ^ ((keys >> np.int32(31)) & np.int32(0x7FFFFFFF))).view(np.float32)
    keys = khi.astype(np.int32)
    hi[:tasks] = (keys ^ ((keys >> np.int32(31)) & np.int32(0x7FFFFFFF))).view(np.float32)


def _quantize(xbuf, m, scale, zp, qmax, cbuf, hbuf):
    """Codes of one block into ``cbuf`` and their dequantized values into ``hbuf``: the torch
    path's mul, add, round half to even, clamp (a −0 becomes +0, as torch's vector clamp does)
    and (q − zp)/scale, each rounded to fp32."""
    zero = np.float32(0.0)
    for i in range(m):
        q = np.rint(xbuf[i] * scale + zp)
        q = q if q > zero else zero
        q = q if q < qmax else qmax
        cbuf[i] = np.uint8(q)
        hbuf[i] = (q - zp) / scale


def _pack(codes, bits, out):
    """Bit-pack a block's codes into ``out`` (from its first byte; tvq.quant.packing's layout).
    Each group of 8 codes is read as one uint64 (code s in byte s) and its fields gathered to
    bits s·b … (s+1)·b − 1 with shifts and masks, so groups vectorize; a group takes b bytes,
    stored as one word when b is 1, 2, 4 or 8. A ragged tail packs code by code."""
    m = codes.size
    groups = m // 8
    words = codes[: groups * 8].view(np.uint64)
    width = np.uint64(bits)
    mask = np.uint64((1 << bits) - 1)
    gap = np.uint64(8 - bits)
    if bits == 8:
        wide = out[: groups * 8].view(np.uint64)
        for g in range(groups):
            wide[g] = words[g]
    elif bits == 4:
        o4 = out[: groups * 4].view(np.uint32)
        for g in range(groups):
            o4[g] = np.uint32(_gather(words[g], width, mask, gap))
    elif bits == 2:
        o2 = out[: groups * 2].view(np.uint16)
        for g in range(groups):
            o2[g] = np.uint16(_gather(words[g], width, mask, gap))
    elif bits == 1:
        for g in range(groups):
            out[g] = np.uint8(_gather(words[g], width, mask, gap))
    else:
        for g in range(groups):
            v = _gather(words[g], width, mask, gap)
            o = out[g * bits : g * bits + bits]
            for b in range(bits):
                o[b] = np.uint8((v >> np.uint64(8 * b)) & np.uint64(255))
    if groups * 8 < m:
        c = codes[groups * 8 :]
        v = np.uint64(0)
        for s in range(c.size):
            v |= np.uint64(c[s]) << np.uint64(s * bits)
        o = out[groups * bits :]
        for b in range((c.size * bits + 7) // 8):
            o[b] = np.uint8((v >> np.uint64(8 * b)) & np.uint64(255))


def _gather(w, width, mask, gap):
    """8 codes, one per byte of ``w``, as one 8·b-bit field sequence: code s moves down by s·(8 − b)."""
    v = w & mask
    for s in range(1, 8):
        v |= (w >> (gap * np.uint64(s))) & (mask << (width * np.uint64(s)))
    return v


def _sq_sums(hbuf, xbuf, tbuf, pbuf, m, ref_tau):
    """(Σ (x̂ − x)², Σ x² or Σ (θ − θ_pre)²) of one block: fp32 differences, exact fp64 squares,
    summed in the order the vectorizer picks (compiled with ``reassoc``: a statistic)."""
    err = 0.0
    ref = 0.0
    for i in range(m):
        d = np.float64(hbuf[i] - xbuf[i])
        err += d * d
    if ref_tau:
        for i in range(m):
            t = np.float64(tbuf[i] - pbuf[i])
            ref += t * t
    else:
        for i in range(m):
            t = np.float64(xbuf[i])
            ref += t * t
    return err, ref


def _encode(a0, a1, a2, a3, kinds, n, pre, pkind, hat, mode, table, scales, zps, bits, constants, p0, p1, p2, p3, recon, err, ref):
    """Quantize each of up to 4 tasks' x with (``scales[j]``, ``zps[j]``) at ``bits`` into its
    slot of ``p0``-``p3`` (an empty slot: a constant task, x̂ = ``constants[j]``), x̂ of one task
    into ``recon`` (when it has n elements; may be the task's own memory), and with STATS sum
    into ``err[j]`` |x̂ − x|² and into ``ref[j]`` |x|², or |θ − θ_pre|² with REF_TAU (fp64
    sums of exact squares); θ_pre and β̂ are read once per block for all tasks."""
    tasks = kinds.size
    tbuf = np.empty(BLOCK, np.float32)
    pbuf = np.empty(BLOCK, np.float32)
    rbuf = np.empty(BLOCK, np.float32)
    xbuf = np.empty(BLOCK, np.float32)
    hbuf = np.empty(BLOCK, np.float32)
    cbuf = np.empty(BLOCK, np.uint8)
    qmax = np.float32((1 << bits) - 1)
    write = recon.size == n
    for j in range(tasks):
        err[j] = 0.0
        ref[j] = 0.0
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        _reference(pre, pkind, hat, mode, table, start, m, pbuf, rbuf)
        for j in range(tasks):
            _difference(_slot(a0, a1, a2, a3, j), kinds[j], mode, table, start, m, tbuf, rbuf, xbuf)
            packed = _slot(p0, p1, p2, p3, j)
            if packed.size == 0:
                for i in range(m):
                    hbuf[i] = constants[j]
            else:
                _quantize(xbuf, m, scales[j], zps[j], qmax, cbuf, hbuf)
                _pack(cbuf[:m], bits, packed[start * bits // 8 : (start + m) * bits // 8 + 1])
            if write:
                r = recon[start : start + m]
                for i in range(m):
                    r[i] = hbuf[i]
            if mode & STATS:
                e, s = _sq_sums(hbuf, xbuf, tbuf, pbuf, m, (mode & REF_TAU) != 0)
                err[j] += e
                ref[j] += s


def _realign(packed, bits, n, out):
    """3-bit codes into 4-bit fields, 5- to 7-bit codes one per byte (``out``, zeroed tail): the
    entropy coder's byte-aligned layout (tvq.quant.entropy.to_aligned). Whole groups of 8 codes
    (b bytes in, one 32- or 64-bit word out) in one loop, the ragged last group apart."""
    mask = np.uint64((1 << bits) - 1)
    width = 4 if bits == 3 else 8
    whole = n // 8
    if width == 4:
        words4 = out[: whole * 4].view(np.uint32)
        for g in range(whole):
            words4[g] = np.uint32(_spread(_group(packed, g * bits, bits), bits, 4, mask, 8))
    else:
        words8 = out[: whole * 8].view(np.uint64)
        for g in range(whole):
            words8[g] = _spread(_group(packed, g * bits, bits), bits, 8, mask, 8)
    k = n - whole * 8
    if k:
        v = _spread(_group(packed[whole * bits :], 0, (k * bits + 7) // 8), bits, width, mask, k)
        tail = out[whole * width :]
        for b in range(tail.size):
            tail[b] = np.uint8((v >> np.uint64(8 * b)) & np.uint64(255))


def _group(packed, at, nbytes):
    """``nbytes`` bytes of ``packed`` from ``at`` as one little-endian word."""
    word = np.uint64(0)
    for b in range(nbytes):
        word |= np.uint64(packed[at + b]) << np.uint64(8 * b)
    return word


def _spread(word, bits, width, mask, k):
    """The first ``k`` codes of ``bits`` bits in ``word``, each moved to a field of ``width`` bits."""
    v = np.uint64(0)
    for s in range(k):
        v |= ((word >> np.uint64(s * bits)) & mask) << np.uint64(s * width)
    return v


def _mean_step(acc, a0, a1, a2, a3, count, kind, table, fresh, total, pre, pkind):
    """Up to 4 more tasks of θ_avg − θ_pre, a block at a time, in ``acc`` (fp32): from zero when
    ``fresh`` (tvq.quant.chunks.Mean: zero, then each θ_t added in order), and when ``total``
    is set, the sum divided by it and θ_pre subtracted (β): one pass for up to 4 tasks."""
    n = acc.size
    blk = np.empty(BLOCK, np.float32)
    tmp = np.empty(BLOCK, np.float32)
    zero = np.float32(0.0)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        a = acc[start : start + m]
        for i in range(m):
            blk[i] = zero if fresh else a[i]
        for j in range(count):
            _load(_slot(a0, a1, a2, a3, j), kind, table, start, m, tmp)
            for i in range(m):
                blk[i] = blk[i] + tmp[i]
        if total:
            _load(pre, pkind, table, start, m, tmp)
            divisor = np.float32(total)
            for i in range(m):
                a[i] = blk[i] / divisor - tmp[i]
        else:
            for i in range(m):
                a[i] = blk[i]


_KERNELS = (
    "_load",
    "_reference",
    "_difference",
    "_slot",
    "_extent",
    "_range",
    "_quantize",
    "_gather",
    "_pack",
    "_sq_sums",
    "_encode",
    "_group",
    "_spread",
    "_realign",
    "_mean_step",
)
_lock = threading.Lock()
_jitted: dict[str, Any] = {}


def _jit(numba: Any, fn: Any) -> Any:
    """``fn`` compiled: cached on disk where numba finds a writable place, else per process."""
    options: dict[str, Any] = {"nogil": True, "error_model": "numpy"}
    if fn is _sq_sums:
        options["fastmath"] = {"reassoc"}  # the sums vectorize; no contraction, so each square stays exact
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function …: no locator available" (read-only install, no home)
        return numba.njit(**options)(fn)


def compiled(n: int | None = None) -> dict[str, Any] | None:
    """The jitted kernels, or None when they are off (``TVQ_QUANT_KERNEL=torch``), numba is
    missing, or a tensor of ``n`` elements is below ``MIN_ELEMENTS``: callers then take the
    torch path, which writes the same bytes."""
    if os.environ.get(ENV, "numba") == "torch" or (n is not None and n < MIN_ELEMENTS):
        return None
    with _lock:
        if not _jitted:
            try:
                import numba
            except ImportError:
                return None
            module = globals()
            for name in _KERNELS:  # callees first: callers see them jitted
                module[name] = _jitted[name.lstrip("_")] = _jit(numba, module[name])
    return _jitted


_F16_TABLE: list[np.ndarray] = []


def f16_table() -> np.ndarray:
    """fp32 of every fp16 bit pattern, as torch converts them (NaN payloads included)."""
    if not _F16_TABLE:
        patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)  # wraps: every 16-bit pattern once
        _F16_TABLE.append(patterns.view(torch.float16).float().numpy())
    return _F16_TABLE[0]


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's elements as flat bytes (contiguous first): one array type for every dtype,
    so each kernel compiles once, not once per combination of input dtypes."""
    return t.reshape(-1).contiguous().view(torch.uint8).numpy()


def as_array(t: torch.Tensor) -> np.ndarray:
    """An fp32 CPU tensor's flat elements (shared memory: the kernels write there)."""
    return t.reshape(-1).numpy()


# -- the torch-facing driver -----------------------------------------------------------------

_EMPTY_F32 = np.empty(0, np.float32)
_EMPTY_U8 = np.empty(0, np.uint8)


def applies(spec: QuantSpec, *tensors: torch.Tensor | None) -> bool:
    """Whether the kernels encode this: the paper's min–max (per tensor, asymmetric) of host
    tensors stored as fp32, bf16 or fp16 (fp64 keeps the torch path's exact convention)."""
    plain = spec.streams and spec.mapping is MappingType.ASYMMETRIC
    return plain and all(t is None or (t.device.type == "cpu" and t.dtype in KINDS) for t in tensors)


def encode_minmax(
    thetas: Sequence[torch.Tensor],
    pre: torch.Tensor | None,
    spec: QuantSpec,
    *,
    hat: torch.Tensor | None = None,
    ref_tau: bool = False,
    stats: bool = True,
    recon: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> list[QuantResult] | None:
    """What ``encode_chunks`` returns for x_t = θ_t − ref (ref = ``hat`` + θ_pre, θ_pre, or
    nothing when ``pre`` is None), quantized with ``spec``: the same codes, parameters and
    ``recon`` (one task: x̂ in fp32, which may be θ's own memory), error statistics (with
    ``stats``) against x_t, or with ``ref_tau`` |x̂ − x|² and |θ_t − θ_pre|², up to summation
    order. None when the kernels do not apply (``applies``) or are off: take the torch path.

    A non-finite x_t is an EncodeError with the task the torch path names (its first chunk of
    ``chunk`` elements holding one, then the first task), before any code is formed."""
    kernels = compiled(thetas[0].numel())
    if kernels is None or not applies(spec, *thetas, pre, hat) or (hat is not None and (pre is None or hat.dtype != torch.float32)):
        return None
    n = thetas[0].numel()
    table = f16_table() if any(t is not None and t.dtype == torch.float16 for t in (*thetas, pre)) else _EMPTY_F32
    pre_a, pkind = (as_bytes(pre), KINDS[pre.dtype]) if pre is not None else (_EMPTY_U8, F32)
    hat_a = as_array(hat) if hat is not None else _EMPTY_F32
    mode = (HAS_PRE if pre is not None else 0) | (HAS_HAT if hat is not None else 0)
    mode |= (STATS if stats else 0) | (REF_TAU if ref_tau and pre is not None else 0)
    groups = [list(range(first, min(first + 4, len(thetas)))) for first in range(0, len(thetas), 4)]  # 4 tasks per call
    operands = [as_bytes(t) for t in thetas]
    kinds = np.array([KINDS[t.dtype] for t in thetas], np.int64)
    lo, hi = np.empty(len(thetas), np.float32), np.empty(len(thetas), np.float32)
    first_bad, negzero = np.empty(len(thetas), np.int64), np.empty(len(thetas), np.bool_)
    for g in groups:
        at = slice(g[0], g[-1] + 1)
        kernels["range"](
            *_slots([operands[t] for t in g]), kinds[at], n, pre_a, pkind, hat_a, mode, table, lo[at], hi[at], first_bad[at], negzero[at]
        )
    bad = [(int(first_bad[t]) // chunk, t) for t in range(len(thetas)) if first_bad[t] >= 0]
    if bad:
        raise EncodeError(NOT_FINITE, task=min(bad)[1])
    params = []
    for t in range(len(thetas)):
        lo_f, hi_f = float(lo[t]) + 0.0, float(hi[t]) + 0.0  # a zero end is +0 when no x is −0 (+ 0.0 makes it so)
        if negzero[t] and (lo_f == 0 or hi_f == 0):  # then which zero the torch path's reductions keep is theirs to say
            lo_f, hi_f = _torch_range(thetas[t], pre, hat, chunk)
        try:
            params.append(params_from_minmax(spec, lo_f, hi_f))
        except EncodeError as exc:
            raise exc.at(task=t) from None
    packed = [None if p.constant is not None else torch.empty(packed_nbytes(n, p.bits), dtype=torch.uint8) for p in params]
    scales = np.array([0.0 if p.constant is not None else p.scale for p in params], np.float32)
    zps = np.array([0.0 if p.constant is not None else p.zero_point for p in params], np.float32)
    constants = np.array([0.0 if p.constant is None else p.constant for p in params], np.float32)
    err, ref = np.zeros(len(thetas), np.float64), np.zeros(len(thetas), np.float64)
    recon_a = _EMPTY_F32 if recon is None else as_array(recon)
    for g in groups:
        at = slice(g[0], g[-1] + 1)
        codes = _slots([_EMPTY_U8 if packed[t] is None else packed[t].numpy() for t in g])  # type: ignore[union-attr]
        kernels["encode"](*_slots([operands[t] for t in g]), kinds[at], n, pre_a, pkind, hat_a, mode, table, scales[at], zps[at],
                          spec.bits, constants[at], *codes, recon_a, err[at], ref[at])  # fmt: skip
    if not stats:
        return [QuantResult(code, p) for code, p in zip(packed, params, strict=True)]
    return [QuantResult(code, p, float(e), float(r)) for code, p, e, r in zip(packed, params, err, ref, strict=True)]


def _slots(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Up to 4 arrays as the kernels' four slots (empty ones after)."""
    return [*arrays, *[arrays[0][:0]] * (4 - len(arrays))]


def _torch_range(theta: torch.Tensor, pre: torch.Tensor | None, hat: torch.Tensor | None, chunk: int) -> tuple[float, float]:
    """The torch path's (min, max) of x, zeros' signs included: per chunk ``aminmax`` of the
    same fp32 ops, combined with Python's min and max in chunk order."""
    flat, lo, hi = theta.reshape(-1), float("inf"), float("-inf")
    for start in range(0, flat.numel(), chunk):
        x = flat[start : start + chunk].float()
        if pre is not None:
            ref = pre.reshape(-1)[start : start + chunk].float()
            ref = torch.add(hat.reshape(-1)[start : start + chunk], ref) if hat is not None else ref
            x = torch.sub(x, ref)
        mn, mx = (float(v) for v in torch.aminmax(x))
        lo, hi = min(lo, mn), max(hi, mx)
    return lo, hi


def realigned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor | None:
    """``tvq.quant.entropy.to_aligned`` of 3-, 5-, 6- or 7-bit codes, the same bytes 10-50x
    faster (the torch path widens every code to int64); None for the other widths or when
    the kernels are off."""
    kernels = compiled(n)
    if kernels is None or bits not in (3, 5, 6, 7) or packed.device.type != "cpu":
        return None
    out = torch.empty(packed_nbytes(n, 4 if bits == 3 else 8), dtype=torch.uint8)
    kernels["realign"](packed.reshape(-1).numpy(), bits, n, out.numpy())
    return out


def base_difference(thetas: Sequence[torch.Tensor], pre: torch.Tensor, out: torch.Tensor) -> bool:
    """β = θ_avg − θ_pre into ``out`` (fp32, flat) as ``torch.sub(Mean(thetas), θ_pre32)`` makes
    it for tasks that are not all identical (Mean copies the first of identical ones), bit for
    bit, 4 tasks per pass; False (``out`` untouched) when the kernels are off or do not apply
    (tasks stored in different dtypes)."""
    kernels = compiled(pre.numel())
    dtypes = {t.dtype for t in thetas}
    if kernels is None or len(dtypes) != 1 or not all(t.device.type == "cpu" for t in (*thetas, pre, out)):
        return False
    if not set(KINDS).issuperset({*dtypes, pre.dtype}):
        return False
    table = f16_table() if torch.float16 in {*dtypes, pre.dtype} else _EMPTY_F32
    arrays = [as_bytes(t) for t in thetas]
    kind, pre_a = KINDS[thetas[0].dtype], as_bytes(pre)
    for first in range(0, len(arrays), 4):
        part = arrays[first : first + 4]
        last = first + 4 >= len(arrays)
        kernels["mean_step"](as_array(out), *_slots(part), len(part), kind, table, first == 0, len(arrays) if last else 0, pre_a, KINDS[pre.dtype])
    return True
