"""Min-max quantization of differences x_t = a_t − b, fused and chunked.

The plain path forms each task vector τ_t = θ_t − θ_pre as a full fp32 tensor, then walks it
again for the range, the codes, the reconstruction and the error: five or six passes over
memory per task, each 4 bytes per element. Here every pass works on cache-sized chunks
of the (bf16) inputs: one pass for the ranges of all tasks, one that forms the codes,
packs them and measures the error. No full-size fp32 temporary exists, and each element
sees exactly the fp32 operations of ``tvq.quant.minmax`` (and of ``tvq.encode.mean_of``
for the RTVQ base) in the same order, so codes and pack bytes are bit-identical to the
plain path's.

Operands are *chunk sources*: callables ``(start, end) -> fp32 chunk`` that remember their
last chunk, so a source shared by several tasks (θ_pre) is converted once per chunk.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tvq.errors import EncodeError
from tvq.quant.minmax import (
    NOT_FINITE,
    MinMaxParams,
    params_from_range,
    scalar_tensors,
)
from tvq.quant.packing import pack_float_codes, packed_nbytes

CHUNK = 1 << 18  # elements: 1 MiB fp32 buffers stay in cache; smaller chunks spend more time in Python


@dataclass
class DiffCode:
    """One tensor's result: packed codes (None when constant), parameters, error statistics."""

    packed: torch.Tensor | None
    params: MinMaxParams
    sq_err: float  # |τ̂ − τ|²
    sq_ref: float  # |τ|²


class ChunkSource:
    """fp32 chunks of something; the last chunk is cached (shared operands cost one pass)."""

    def __init__(self, chunk: int) -> None:
        self._buf = torch.empty(chunk, dtype=torch.float32)
        self._last: tuple[int, int] | None = None
        self._value: torch.Tensor | None = None

    def __call__(self, start: int, end: int) -> torch.Tensor:
        if self._last != (start, end):
            self._value = self.compute(start, end, self._buf[: end - start])
            self._last = (start, end)
        return self._value  # type: ignore[return-value]

    def compute(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Converted(ChunkSource):
    """A tensor's chunks in fp32: a view when it is fp32, else converted (exactly) into a buffer."""

    def __init__(self, t: torch.Tensor, chunk: int) -> None:
        super().__init__(chunk if t.dtype != torch.float32 else 0)
        self.flat = t.reshape(-1)

    def compute(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        part = self.flat[start:end]
        return part if part.dtype == torch.float32 else out.copy_(part)


class Elementwise(ChunkSource):
    """``op(a, b)`` of two chunk sources in fp32: ``torch.sub`` gives a − b (bf16 θ_t minus fp32
    θ_pre is exactly ``t.float() - pre32``), ``torch.add`` a + b (commutative bit for bit)."""

    def __init__(self, op: Callable[..., torch.Tensor], a: ChunkSource, b: ChunkSource, chunk: int) -> None:
        super().__init__(chunk)
        self.op, self.a, self.b = op, a, b

    def compute(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        return self.op(self.a(start, end), self.b(start, end), out=out)


def difference(a: ChunkSource, b: ChunkSource, chunk: int) -> Elementwise:
    return Elementwise(torch.sub, a, b, chunk)


class Mean(ChunkSource):
    """``tvq.encode.mean_of`` chunk by chunk: summed in order from zero, then divided; the
    mean of identical tensors (decided over the whole tensors) is the first one."""

    def __init__(self, tensors: Sequence[torch.Tensor], chunk: int) -> None:
        super().__init__(chunk)
        self.flats = [t.reshape(-1) for t in tensors]
        self.identical = all(torch.equal(t, tensors[0]) for t in tensors[1:])

    def compute(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        if self.identical:
            return out.copy_(self.flats[0][start:end])
        out.zero_()
        for flat in self.flats:
            out += flat[start:end]
        return out.div_(len(self.flats))


Chunks = Callable[[int, int], torch.Tensor]


def sq_norm(x: torch.Tensor) -> float:
    """|x|² as an fp32 dot product (cheap, and all a statistic needs); a chunk whose fp32 dot
    overflows (|x| beyond ~1e19) is summed again in fp64, so |x|² is finite exactly when x is."""
    value = float(torch.dot(x, x))
    if math.isfinite(value):
        return value
    wide = x.double()
    return float(torch.dot(wide, wide))


def encode_chunks(
    xs: Sequence[Chunks],
    n: int,
    bits: int,
    *,
    taus: Sequence[Chunks] | None = None,
    base_hat: Chunks | None = None,
    recon_out: torch.Tensor | None = None,
    measure: bool = True,
    chunk: int = CHUNK,
) -> list[DiffCode]:
    """Quantize each x_t (``n`` elements, given by chunks) with per-tensor min-max.

    The error statistics are |τ̂_t − τ_t|² and |τ_t|², τ_t = ``taus[t]`` (default: x_t
    itself). With ``base_hat`` (RTVQ against θ_avg) τ̂_t = base_hat + x̂_t; without it the
    error is |x̂_t − x_t|², which is |τ̂_t − τ_t|² whenever τ_t − τ̂_t = x_t − x̂_t in real
    arithmetic: TVQ (x_t = τ_t) and RTVQ with error correction (x_t = τ_t − β̂, τ̂_t = β̂ +
    x̂_t); it differs from the three-term form only by fp32 rounding, and saves two passes.
    With ``recon_out`` (one x only), x̂ is also written there in fp32; ``measure=False`` skips
    the error statistics (they stay 0). ``chunk`` must be a multiple of 8 so that every
    chunk's packed codes start on a byte boundary.

    A non-finite x_t (an fp32 difference that overflowed, or a NaN/Inf input) is found by
    pass 1's min/max at no extra cost: EncodeError with ``task=t``, before any code is formed."""
    assert chunk % 8 == 0
    tasks = len(xs)
    lo, hi = [float("inf")] * tasks, [float("-inf")] * tasks
    sq_ref, sq_err = [0.0] * tasks, [0.0] * tasks
    q_buf = torch.empty(min(chunk, max(n, 1)), dtype=torch.float32)
    for start in range(0, n, chunk):  # pass 1: ranges (and |τ|² when x is τ)
        end = min(start + chunk, n)
        for t, x_of in enumerate(xs):
            x = x_of(start, end)
            mn, mx = (float(v) for v in torch.aminmax(x))
            if not (math.isfinite(mn) and math.isfinite(mx)):  # Python's min/max would drop a NaN
                raise EncodeError(NOT_FINITE, task=t)
            lo[t], hi[t] = min(lo[t], mn), max(hi[t], mx)
            if measure and taus is None:
                sq_ref[t] += sq_norm(x)
    params = []
    for t in range(tasks):
        try:
            params.append(params_from_range(torch.tensor(lo[t]), torch.tensor(hi[t]), bits))
        except EncodeError as exc:
            raise exc.at(task=t) from None
    packed = [None if p.constant is not None else torch.empty(packed_nbytes(n, bits), dtype=torch.uint8) for p in params]
    qmax = 2**bits - 1
    scalars = [scalar_tensors(p) if p.constant is None else None for p in params]
    for start in range(0, n, chunk):  # pass 2: codes, packed in place, reconstruction and error
        end = min(start + chunk, n)
        q = q_buf[: end - start]
        for t, x_of in enumerate(xs):
            x = x_of(start, end)
            if packed[t] is None:
                q.fill_(params[t].constant)
            else:
                scale, zero_point = scalars[t]
                torch.mul(x, scale, out=q).add_(zero_point).round_().clamp_(0, qmax)
                at = start * bits // 8
                pack_float_codes(q, bits, packed[t][at : at + packed_nbytes(end - start, bits)])
                q.sub_(zero_point).div_(scale)
            if recon_out is not None:
                recon_out[start:end] = q
            if not measure:
                continue
            tau = x
            if taus is not None:
                tau = taus[t](start, end)
                sq_ref[t] += sq_norm(tau)
            if base_hat is not None:
                q.add_(base_hat(start, end)).sub_(tau)
            else:
                q.sub_(x)
            sq_err[t] += sq_norm(q)
    return [DiffCode(packed[t], params[t], sq_err[t], sq_ref[t]) for t in range(tasks)]


def encode_differences(
    minuends: Sequence[torch.Tensor],
    subtrahend: torch.Tensor,
    bits: int,
    *,
    pretrained: torch.Tensor | None = None,
    base_hat: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> list[DiffCode]:
    """Quantize x_t = minuends[t] − subtrahend (fp32 arithmetic) with per-tensor min-max.

    The error is measured against τ_t = minuends[t] − ``pretrained`` (default: the
    subtrahend, i.e. x_t is τ_t) with the reconstruction ``base_hat`` + x̂_t or x̂_t."""
    sub = Converted(subtrahend, chunk)
    thetas = [Converted(m, chunk) for m in minuends]
    xs = [difference(theta, sub, chunk) for theta in thetas]
    taus = None
    if pretrained is not None:
        pre = Converted(pretrained, chunk)
        taus = [difference(theta, pre, chunk) for theta in thetas]
    hat = Converted(base_hat, chunk) if base_hat is not None else None
    return encode_chunks(xs, subtrahend.numel(), bits, taus=taus, base_hat=hat, chunk=chunk)


def encode_residual(
    finetuned: Sequence[torch.Tensor],
    pretrained: torch.Tensor,
    bits: int,
    base_bits: int,
    error_correction: bool,
    chunk: int = CHUNK,
) -> tuple[DiffCode, list[DiffCode]]:
    """RTVQ, fused: the base β = θ_avg − θ_pre at ``base_bits``, then every offset θ_t − ref
    at ``bits``, where ref = β̂ + θ_pre with error correction and θ_avg without. β, then
    β̂ in its place, is held in full (fp32: β is formed once, not in each pass); θ_avg and
    ref exist a chunk at a time. Same bytes as ``tvq.encode``'s plain path; errors are
    against τ_t = θ_t − θ_pre with τ̂_t = β̂ + ô_t. A base that cannot be encoded is an
    EncodeError with ``base=True``; an offset, with its task's index."""
    n = pretrained.numel()
    pre = Converted(pretrained, chunk)
    avg = Mean(finetuned, chunk)
    beta = scratch(n)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        torch.sub(avg(start, end), pre(start, end), out=beta[start:end])
    # β̂ overwrites β chunk by chunk: each chunk of β is spent before its reconstruction lands
    try:
        (base,) = encode_chunks([Converted(beta, chunk)], n, base_bits, recon_out=beta, measure=False, chunk=chunk)
    except EncodeError as exc:
        raise exc.at(base=True) from None
    hat = Converted(beta, chunk)
    reference = Elementwise(torch.add, hat, pre, chunk) if error_correction else avg
    thetas = [Converted(t, chunk) for t in finetuned]
    xs = [difference(theta, reference, chunk) for theta in thetas]
    taus = [difference(theta, pre, chunk) for theta in thetas]
    return base, encode_chunks(xs, n, bits, taus=taus, base_hat=None if error_correction else hat, chunk=chunk)


SCRATCH_MAX = 1 << 24  # elements, 64 MiB fp32 per thread: a 1B model's MLP matrices, a 7B model's attention ones
_scratch = threading.local()


def scratch(n: int) -> torch.Tensor:
    """An fp32 work buffer of ``n`` elements, reused by this thread's next call: fresh pages
    cost a fault and a zeroing pass each time (`clear_page_erms` was ~5% of RTVQ quantize's
    CPU samples). Bigger tensors get a fresh buffer, so a thread keeps at most 64 MiB."""
    if n > SCRATCH_MAX:
        return torch.empty(n, dtype=torch.float32)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n]
