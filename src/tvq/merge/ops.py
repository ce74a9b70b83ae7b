"""Tensor operations shared by the methods: top-k thresholds, sign election, DARE masks.

Top-k never sorts. The k-th largest |τ| is an exact radix select on the fp32 bit patterns
(two passes of 2^15- and 2^16-bin histograms): over a whole model that is TIES's original
global threshold in O(1) extra memory, and per large tensor it beats ``torch.kthvalue``
(which copies the tensor and allocates int64 indices); small tensors and rows use kthvalue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

import torch

_ZERO = torch.tensor(0.0)


def task_sum(taus: torch.Tensor) -> torch.Tensor:
    """Σ_t τ_t over ``[T, ...]``, added in task order: ((τ_0 + τ_1) + τ_2) + …

    ``taus.sum(dim=0)`` leaves the order to torch's reduction, which changes with T and the
    tensor's size (from T = 8 on, measured); a fixed order makes a merge independent of how
    a tensor is chunked or decoded (tvq.merge.coded), bit for bit."""
    total = taus[0].clone()
    for row in taus[1:]:
        total += row
    return total


def keep_count(density: float, n: int) -> int:
    """How many entries a density keeps: int(density·n), at least one when density > 0 (as mergekit)."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def kth_largest(values: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """The k-th largest of ``values`` (flattened, or along ``dim``), by quickselect."""
    if dim is None:
        values = values.reshape(-1)
        dim = 0
    n = values.shape[dim]
    return torch.kthvalue(values, n - k + 1, dim=dim, keepdim=True).values


def magnitude_threshold(x: torch.Tensor, density: float) -> torch.Tensor:
    """The |x| an entry needs to be among the top-``density`` fraction (0 keeps all, inf none).

    Small tensors use ``torch.kthvalue``; large ones the radix select below, which is about
    3x faster and needs no copy of the tensor (kthvalue copies it and allocates int64 indices).
    """
    n = x.numel()
    k = keep_count(density, n)
    if k >= n:
        return torch.tensor(0.0)
    if k == 0:
        return torch.tensor(float("inf"))
    if n < 1 << 16:
        return kth_largest(x.abs(), k).squeeze()
    return global_kth_largest(lambda: iter((x.reshape(1, -1),)), k, 1)[0]


def ties_keep(taus: torch.Tensor, density: float, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """TIES trim as a bool mask ``[T, *shape]``: per-row top-k (or the given global thresholds)."""
    keep = torch.empty(taus.shape, dtype=torch.bool)
    for t, row in enumerate(taus):
        thr = thresholds[t] if thresholds is not None else magnitude_threshold(row, density)
        torch.ge(row.abs(), thr, out=keep[t])
    return keep


def trimmed_sum(taus: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ_t τ_t over the kept entries (one scratch buffer for all tasks)."""
    total = torch.zeros(taus.shape[1:])
    buf = torch.empty_like(total)
    for row, k in zip(taus, keep, strict=True):
        total += torch.where(k, row, _ZERO, out=buf)
    return total


def row_thresholds(taus: torch.Tensor, density: float) -> torch.Tensor:
    """Per-row top-k magnitude thresholds ``[T]`` (radix select: no copy of a row)."""
    return torch.stack([magnitude_threshold(row, density) for row in taus])


_TIES_CHUNK = 1 << 20  # columns per chunk: T x chunk temporaries instead of T x n


def ties_merge(taus: torch.Tensor, thresholds: torch.Tensor, majority: float | None, aggregate: str = "mean") -> torch.Tensor:
    """TIES on ``[T, *shape]`` with per-row trim thresholds: trim, elect the sign by mass (exact
    zeros take ``majority``, or this tensor's majority sign), disjoint mean (or sum).

    Column chunk by column chunk: every element sees the same fp32 operations in the same
    order as whole-tensor code, but the scratch (trim mask, sums, buffers) is a few chunks,
    not ~5 copies of the tensor; the elected sign is kept as int8."""
    flat = taus.reshape(taus.shape[0], -1)
    n = flat.shape[1]
    thr = thresholds.reshape(-1, 1)
    sign = torch.empty(n, dtype=torch.int8)
    for start in range(0, n, _TIES_CHUNK):
        part = flat[:, start : start + _TIES_CHUNK]
        sign[start : start + part.shape[1]] = torch.sign(trimmed_sum(part, part.abs() >= thr))
    if majority is None:
        majority = float(torch.sign(sign.sum(dtype=torch.int64)))
    sign[sign == 0] = int(majority)
    out = torch.empty(n, dtype=taus.dtype)
    for start in range(0, n, _TIES_CHUNK):
        part = flat[:, start : start + _TIES_CHUNK]
        end = start + part.shape[1]
        out[start:end] = disjoint_merge(part, part.abs() >= thr, sign[start:end], aggregate)
    return out.reshape(taus.shape[1:])


def disjoint_merge(taus: torch.Tensor, keep: torch.Tensor, sign: torch.Tensor, aggregate: str = "mean") -> torch.Tensor:
    """Keep each trimmed τ_t only where it agrees with the elected sign; mean (or sum) over those tasks."""
    total = torch.zeros(sign.shape, dtype=taus.dtype)
    count = torch.zeros(sign.shape, dtype=torch.int16)
    buf = torch.empty(sign.shape, dtype=taus.dtype)
    agree = torch.empty(sign.shape, dtype=torch.bool)
    for row, k in zip(taus, keep, strict=True):
        # same sign as the election: row·sign > 0 (sign is exactly ±1 or 0, so no underflow)
        torch.gt(torch.mul(row, sign, out=buf), 0, out=agree)
        agree &= k
        total += torch.where(agree, row, _ZERO, out=buf)
        count += agree
    if aggregate == "sum":
        return total
    return total.div_(count.clamp_(min=1))


def global_kth_largest(batches: Callable[[], Iterable[torch.Tensor]], k: int, rows: int) -> torch.Tensor:
    """Exact k-th largest |x| per row over many ``[rows, ...]`` tensors, in two streaming passes.

    |x| as fp32 is non-negative, so its int32 bit pattern orders like the value: pass 1
    counts the high 15 bits, which pins the bucket holding the k-th largest; pass 2 counts
    the low 16 bits inside that bucket, which pins the exact value.
    """
    hi = torch.zeros(rows, 1 << 15, dtype=torch.int64)
    for batch in batches():
        for r in range(rows):
            for bits in _abs_bits(batch[r]):
                hi[r] += torch.bincount(bits >> 16, minlength=1 << 15)
        del batch  # free it before the generator builds the next one
    bucket, rank = _locate(hi, torch.full((rows,), k, dtype=torch.int64))
    lo = torch.zeros(rows, 1 << 16, dtype=torch.int64)
    for batch in batches():
        for r in range(rows):
            for bits in _abs_bits(batch[r]):
                inside = bits[(bits >> 16) == bucket[r]]
                if inside.numel():
                    lo[r] += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
        del batch
    low, _ = _locate(lo, rank)
    return ((bucket << 16) | low).to(torch.int32).view(torch.float32)


def _abs_bits(x: torch.Tensor, chunk: int = 1 << 22) -> Iterator[torch.Tensor]:
    """int32 bit patterns of |x|, a chunk at a time (bounded temporaries)."""
    flat = x.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        yield flat[start : start + chunk].abs().view(torch.int32)


def _locate(hist: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the bin holding the k-th largest item, and its rank inside that bin."""
    from_top = hist.flip(1).cumsum(1)  # items in bins >= bin
    pos = torch.searchsorted(from_top, k.unsqueeze(1)).squeeze(1)  # first position with count >= k
    bins = hist.shape[1] - 1 - pos
    above = from_top.gather(1, pos.unsqueeze(1)).squeeze(1) - hist.gather(1, bins.unsqueeze(1)).squeeze(1)
    return bins, k - above


def tensor_seed(seed: int, task: str, key: str) -> int:
    """A 63-bit seed per (seed, task, tensor), for DARE's drop mask of one tensor of one task:
    the mask does not depend on the order tensors are processed in. (Not ``bench.train``'s
    per-task fine-tuning seed, which is another rule.)"""
    digest = hashlib.sha256(f"{seed}\0{task}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_(tau: torch.Tensor, drop_rate: float, rescale: bool, seed: int) -> torch.Tensor:
    """DARE in place: drop each entry with probability p, rescale survivors by 1/(1-p)."""
    if drop_rate <= 0:
        return tau
    if drop_rate >= 1:
        return tau.zero_()
    gen = torch.Generator().manual_seed(seed)
    drop = torch.rand(tau.shape, generator=gen) < drop_rate
    tau.masked_fill_(drop, 0.0)
    if rescale:
        tau.div_(1.0 - drop_rate)
    return tau
