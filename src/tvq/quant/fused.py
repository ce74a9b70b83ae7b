"""Min-max quantization of differences x_t = a_t − b, fused and chunked.

The plain path forms each task vector τ_t = θ_t − θ_pre as a full fp32 tensor, then walks it
again for the range, the codes, the reconstruction and the error: five or six passes over
memory per task, each 4 bytes per element. Here every pass works on cache-sized chunks
of the (bf16) inputs: one pass for the ranges of all tasks, one that forms the codes,
packs them and measures the error. No full-size fp32 temporary exists, and each element
sees exactly the fp32 operations of ``tvq.quant.minmax`` in the same order, so the codes
(and the pack bytes) are bit-identical to the plain path's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tvq.quant.minmax import MinMaxParams, params_from_range
from tvq.quant.packing import pack_codes, packed_nbytes

CHUNK = 1 << 18  # elements: 1 MiB fp32 buffers stay in cache; smaller chunks spend more time in Python


@dataclass
class DiffCode:
    """One task's result: packed codes (None when constant), parameters, error statistics."""

    packed: torch.Tensor | None
    params: MinMaxParams
    sq_err: float  # |τ̂ − τ|²
    sq_ref: float  # |τ|²


def _as_fp32(src: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``src`` in fp32: itself when it already is, else converted (exactly) into ``buf``."""
    if src.dtype == torch.float32:
        return src
    out = buf[: src.numel()]
    out.copy_(src)
    return out


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def encode_differences(
    minuends: list[torch.Tensor],
    subtrahend: torch.Tensor,
    bits: int,
    *,
    pretrained: torch.Tensor | None = None,
    base_hat: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> list[DiffCode]:
    """Quantize x_t = minuends[t] − subtrahend (fp32 arithmetic) with per-tensor min-max.

    The error is measured against τ_t = minuends[t] − ``pretrained`` (default: the
    subtrahend, i.e. x_t is τ_t) with the reconstruction τ̂_t = ``base_hat`` + x̂_t (RTVQ:
    the quantized base plus the offset) or x̂_t. ``chunk`` must be a multiple of 8 so that
    every chunk's packed codes start on a byte boundary."""
    assert chunk % 8 == 0
    flats = [m.reshape(-1) for m in minuends]
    sub = subtrahend.reshape(-1)
    pre = pretrained.reshape(-1) if pretrained is not None else None
    extra = base_hat.reshape(-1) if base_hat is not None else None
    n = sub.numel()
    size = min(chunk, max(n, 1))
    sub_buf, pre_buf, x_buf, q_buf, tau_buf = (torch.empty(size, dtype=torch.float32) for _ in range(5))
    codes_buf = torch.empty(size, dtype=torch.uint8)
    tasks = len(flats)
    lo = [float("inf")] * tasks
    hi = [float("-inf")] * tasks
    sq_ref = [0.0] * tasks
    # pass 1: the range of every x_t (and |τ_t|² when x_t is τ_t)
    for start, end in _chunks(n, chunk):
        s = _as_fp32(sub[start:end], sub_buf)
        x = x_buf[: end - start]
        for t, flat in enumerate(flats):
            x.copy_(flat[start:end])
            x.sub_(s)
            mn, mx = torch.aminmax(x)
            lo[t], hi[t] = min(lo[t], float(mn)), max(hi[t], float(mx))
            if pre is None:
                sq_ref[t] += float(torch.dot(x, x))
    params = [params_from_range(torch.tensor(lo[t]), torch.tensor(hi[t]), bits) for t in range(tasks)]
    packed = [None if p.constant is not None else torch.empty(packed_nbytes(n, bits), dtype=torch.uint8) for p in params]
    scalars = [(torch.tensor(p.scale, dtype=torch.float32), torch.tensor(p.zero_point, dtype=torch.float32)) for p in params]
    qmax = 2**bits - 1
    sq_err = [0.0] * tasks
    # pass 2: codes, packed in place, and the reconstruction error
    for start, end in _chunks(n, chunk):
        m = end - start
        s = _as_fp32(sub[start:end], sub_buf)
        p = _as_fp32(pre[start:end], pre_buf) if pre is not None else None
        x, q = x_buf[:m], q_buf[:m]
        for t, flat in enumerate(flats):
            x.copy_(flat[start:end])
            x.sub_(s)
            scale, zero_point = scalars[t]
            if packed[t] is None:
                q.fill_(params[t].constant)
            else:
                q.copy_(x).mul_(scale).add_(zero_point).round_().clamp_(0, qmax)
                codes = codes_buf[:m]
                codes.copy_(q)
                packed[t][start * bits // 8 : start * bits // 8 + packed_nbytes(m, bits)] = pack_codes(codes, bits)
                q.sub_(zero_point).div_(scale)
            if extra is not None:
                q.add_(extra[start:end])
            if p is not None:
                tau = tau_buf[:m]
                tau.copy_(flat[start:end])
                tau.sub_(p)
                sq_ref[t] += float(torch.dot(tau, tau))
            else:
                tau = x
            q.sub_(tau)
            sq_err[t] += float(torch.dot(q, q))
    return [DiffCode(packed[t], params[t], sq_err[t], sq_ref[t]) for t in range(tasks)]
