"""The one way tensors are quantized: chunked, fused, packing in place.

``encode_chunks`` quantizes values given by chunk sources (tvq.quant.chunks) with any
quantizer of tvq.quant.affine. Pass 1 chooses the parameters: a streaming quantizer (per-tensor
min–max) reads the ranges of all tasks a chunk at a time; the others read each whole tensor.
Pass 2 forms each chunk's codes, packs them into the output bytes, dequantizes them in place
and measures the error, so no full-size fp32 temporary exists. A plain call (one tensor,
``tvq.quant.stored.encode_quantized``) is a run with one source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from tvq.errors import EncodeError
from tvq.quant.affine import NOT_FINITE, QParams, QuantSpec, choose_qparams, dequantize_, params_from_minmax, quantize_into
from tvq.quant.chunks import CHUNK, Chunks, Converted, materialize, sq_norm
from tvq.quant.packing import pack_float_codes, packed_nbytes


@dataclass
class QuantResult:
    """One tensor's result: packed codes (None when constant), parameters, error statistics."""

    packed: torch.Tensor | None
    params: QParams
    sq_err: float = 0.0  # |τ̂ − τ|²
    sq_ref: float = 0.0  # |τ|²


@dataclass(frozen=True)
class Measure:
    """What the error statistics compare, chunk by chunk, for task t: τ_t = ``taus[t]``
    (default: x_t itself) and τ̂_t = x̂_t (+ ``plus``) (− ``minus``): RTVQ's τ̂ = β̂ + ô, FQ's
    τ̂ = θ̂_t − θ_pre. With ``against_x`` the error is |x̂_t − x_t|² while |τ|² is of ``taus``:
    for RTVQ with error correction (x_t = τ_t − β̂) it is |τ̂_t − τ_t|² up to fp32 rounding,
    two passes cheaper."""

    taus: Sequence[Chunks] | None = None
    plus: Chunks | None = None
    minus: Chunks | None = None
    against_x: bool = False

    def error(self, t: int, start: int, end: int, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[float, float]:
        """(|τ̂ − τ|², |τ|²) of one chunk; ``x_hat`` is spent."""
        tau = x if self.taus is None else self.taus[t](start, end)
        if self.plus is not None:
            x_hat.add_(self.plus(start, end))
        if self.minus is not None:
            x_hat.sub_(self.minus(start, end))
        x_hat.sub_(x if self.taus is None or self.against_x else tau)
        return sq_norm(x_hat), sq_norm(tau)

    def of_task(self, t: int) -> Measure:
        """This measure for task ``t`` alone (as task 0)."""
        return replace(self, taus=None if self.taus is None else [self.taus[t]])


def encode_chunks(
    xs: Sequence[Chunks],
    n: int,
    spec: QuantSpec,
    *,
    measure: Measure | None = None,
    recon_out: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> list[QuantResult]:
    """Quantize each x_t (``n`` elements, given by fp32 chunks) with ``spec``.

    With ``measure``, the error statistics (summed per chunk, in order); with ``recon_out``
    (one x only), x̂ is also written there in fp32, a chunk after that chunk of x is read (so
    it may be x's own memory). ``chunk`` must be a multiple of 8, so that every chunk's
    packed codes start on a byte boundary.

    A non-finite x_t (an fp32 difference that overflowed, a NaN/Inf input) is an EncodeError
    with ``task=t``, raised by pass 1 before any code is formed."""
    assert chunk % 8 == 0
    if not spec.streams and len(xs) > 1:  # one task at a time: one whole tensor in memory
        results = []
        for t, x_of in enumerate(xs):
            try:
                results += encode_chunks([x_of], n, spec, measure=measure and measure.of_task(t), chunk=chunk)
            except EncodeError as exc:
                raise exc.at(task=t) from None
        return results
    if spec.streams:
        params = _stream_params(xs, n, spec, chunk)
    else:
        xs, params = _whole_params(xs, n, spec, chunk)
    device = xs[0](0, min(chunk, n)).device  # where the sources compute (the first chunk is cached)
    packed = [None if p.constant is not None else torch.empty(packed_nbytes(n, p.bits), dtype=torch.uint8, device=device) for p in params]
    sq_err, sq_ref = [0.0] * len(xs), [0.0] * len(xs)
    q_buf = torch.empty(min(chunk, max(n, 1)), dtype=torch.float32, device=device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        q = q_buf[: end - start]
        for t, x_of in enumerate(xs):
            x = x_of(start, end)
            codes = packed[t]
            if codes is not None:
                quantize_into(x, params[t], q, start)
                at = start * spec.bits // 8
                pack_float_codes(q, spec.bits, codes[at : at + packed_nbytes(end - start, spec.bits)])
            dequantize_(q, params[t], start)
            if recon_out is not None:
                recon_out[start:end] = q
            if measure is not None:
                err, ref = measure.error(t, start, end, x, q)
                sq_err[t] += err
                sq_ref[t] += ref
    return [QuantResult(None if p is None else p.cpu(), params[t], sq_err[t], sq_ref[t]) for t, p in enumerate(packed)]


def _stream_params(xs: Sequence[Chunks], n: int, spec: QuantSpec, chunk: int) -> list[QParams]:
    """Pass 1 of a streaming quantizer: every task's min and max, a chunk at a time."""
    lo, hi = [float("inf")] * len(xs), [float("-inf")] * len(xs)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        for t, x_of in enumerate(xs):
            mn, mx = (float(v) for v in torch.aminmax(x_of(start, end)))
            if not (math.isfinite(mn) and math.isfinite(mx)):
                raise EncodeError(NOT_FINITE, task=t)  # Python's min/max would drop a NaN
            lo[t], hi[t] = min(lo[t], mn), max(hi[t], mx)
    params = []
    for t in range(len(xs)):
        try:
            params.append(params_from_minmax(spec, lo[t], hi[t]))
        except EncodeError as exc:
            raise exc.at(task=t) from None
    return params


def _whole_params(xs: Sequence[Chunks], n: int, spec: QuantSpec, chunk: int) -> tuple[list[Chunks], list[QParams]]:
    """Pass 1 of a quantizer whose estimator reads the whole tensor: each x_t materialized in
    fp32 (no copy when it already is a whole fp32 tensor), its parameters, and x_t as a view."""
    whole: list[Chunks] = []
    params = []
    for t, x_of in enumerate(xs):
        flat = materialize(x_of, n, chunk)
        try:
            params.append(choose_qparams(spec, flat))
        except EncodeError as exc:
            raise exc.at(task=t) from None
        whole.append(Converted(flat))
    return whole, params
