"""Tensor operations shared by the methods: top-k thresholds and masks, sign election, DARE masks.

Top-k never sorts. The k-th largest |τ| is an exact radix select on the fp32 bit patterns
(two passes of 2^15- and 2^16-bin histograms): over a whole model that is TIES's original
global threshold in O(1) extra memory, and per large tensor it beats ``torch.kthvalue``
(which copies the tensor and allocates int64 indices); small tensors and rows use kthvalue.

Ties at the cut-off. A b-bit task vector takes at most 2^b values per tensor, so the k-th
largest |τ| is shared by thousands of entries. ``tie_rule="keep_ties"`` keeps every entry
>= the k-th largest, as the TIES reference and FusionBench do (``kthvalue`` then ``>=``) and
tvq did before, so it keeps more than k. ``"exact"`` (the default) keeps exactly k, as
mergekit (``argsort``) and the Breadcrumbs code (``topk``) do, but with a deterministic choice
among the tied entries where theirs is whatever order torch's sort returns: all entries above
the cut-off value, and of those tied at it the ones first in *hash order*, the order of
``element_hash(tie_seed(task, tensor), flat index)`` (then the index). The hash is a
counter-based function of the element's flat index seeded by the task's and the tensor's
names, never by a position, so the kept set does not depend on the executor, the thread
count, the order of the tasks or which other tensors are merged, and the same rule gives the
same entries from dense tensors and from codes (tvq.merge.coded). At a cut-off of 0 the tied
entries are zeros, which change no merged value: they are taken in index order, unhashed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from tvq.quant.coded import CodedTensor

_ZERO = torch.tensor(0.0)

TieRule = Literal["exact", "keep_ties"]
_M32 = 0xFFFFFFFF
ALL_TIES = 1 << 32  # a hash cut above every 32-bit hash: every tied entry is kept
_NO_INDEX = -1
_ANY_INDEX = (1 << 62) - 1


SUM_CHUNK = 1 << 15  # elements per float64 partial sum: at::internal::GRAIN_SIZE, so torch sums a chunk in one thread


class ChunkSums:
    """Per row, the sum of fp32 values that arrive in consecutive pieces (each row's in element
    order): every chunk of ``SUM_CHUNK`` elements (by flat index) is summed by torch in float64
    and the chunk sums are added in order, so the total has the same bits however the values
    are split into pieces (a whole tensor, or blocks of any size) and whatever the thread count
    (a longer torch sum splits by thread count)."""

    def __init__(self, rows: int) -> None:
        self.totals = [0.0] * rows
        self.tails: list[torch.Tensor | None] = [None] * rows

    def add(self, row: int, values: torch.Tensor) -> None:
        values = values.reshape(-1)
        tail = self.tails[row]
        if tail is not None:
            need = SUM_CHUNK - tail.numel()
            tail, values = torch.cat([tail, values[:need]]), values[need:]
            if tail.numel() < SUM_CHUNK:
                self.tails[row] = tail
                return
            self._chunk(row, tail)
        full = values.numel() - values.numel() % SUM_CHUNK
        for chunk in values[:full].split(SUM_CHUNK):
            self._chunk(row, chunk)
        self.tails[row] = values[full:].clone() if full < values.numel() else None

    def _chunk(self, row: int, chunk: torch.Tensor) -> None:
        self.totals[row] += float(chunk.sum(dtype=torch.float64))

    def finish(self) -> torch.Tensor:
        """The totals (float64 ``[rows]``), the last partial chunks included."""
        for row, tail in enumerate(self.tails):
            if tail is not None:
                self._chunk(row, tail)
                self.tails[row] = None
        return torch.tensor(self.totals, dtype=torch.float64)


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
    return count_threshold(x, keep_count(density, x.numel()))


def count_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x| (0 when k >= numel, inf when k = 0): ``magnitude_threshold`` by count."""
    n = x.numel()
    if k >= n:
        return torch.tensor(0.0)
    if k == 0:
        return torch.tensor(float("inf"))
    if n < 1 << 16:
        return kth_largest(x.abs(), k).squeeze()
    return global_kth_largest(lambda: iter((x.reshape(1, -1),)), k, 1)[0]


def tie_seed(task: str, key: str) -> int:
    """The 64-bit seed of the top-k tie-break of one tensor of one task: from their names."""
    digest = hashlib.sha256(f"tvq-topk\0{task}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


_C1, _C2 = 0x21F0AAAD, 0x735A2D97  # both < 2^31: x·c < 2^63 for x < 2^32, so int64 never overflows


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^32) with low bias (a two-round xorshift-multiply mixer from Chris
    Wellons' hash prospector), in int64 without overflow; ``x`` is consumed."""
    x.bitwise_xor_(x >> 16).mul_(_C1).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15).mul_(_C2).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 15)


def _mix32_int(x: int) -> int:
    """``_mix32`` of one Python int."""
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 15)


def element_hash(seed: int, index: torch.Tensor) -> torch.Tensor:
    """A 32-bit hash (int64 in [0, 2^32)) of each flat element index under a 64-bit seed:
    mix(low 32 bits of the index ^ low half of the seed) ^ mix(high 32 bits ^ high half).

    Counter-based: a pure function of (seed, index), so any subset of the elements hashes
    alike in any order, on any executor. For indices below 2^32 it is a bijection of the
    index, so the hash order of one tensor's entries has no ties."""
    index = index.to(torch.int64)
    lo, hi = seed & _M32, (seed >> 32) & _M32
    if index.numel() and int(index.max()) > _M32:
        return _mix32((index & _M32).bitwise_xor_(lo)).bitwise_xor_(_mix32((index >> 32).bitwise_xor_(hi)))
    return _mix32(index.bitwise_xor(lo)).bitwise_xor_(_mix32_int(hi))


def hash_order_cut(hashes: torch.Tensor, index: torch.Tensor, need: int) -> tuple[int, int]:
    """The ``need``-th entry in (hash, index) order, as (hash, index): entries up to it are kept.
    ``index`` ascends (as ``nonzero`` returns it); 1 <= need <= len; ``hashes`` in [0, 2^32).

    A radix select: a 2^16-bin histogram of the hashes' high halves pins the bucket holding
    the cut, then only that bucket's few entries are selected (``torch.kthvalue`` over every
    tied hash copies them and was a tenth of a 4-task merge's time)."""
    if not bool(hashes.any()):  # a cut-off of 0: index order
        return 0, int(index[need - 1])
    if hashes.numel() > _RADIX_MIN:
        high = hashes >> 16
        hist = torch.bincount(high, minlength=1 << 16)
        cum = hist.cumsum(0)
        bucket = int(torch.searchsorted(cum, torch.tensor([need], dtype=cum.dtype)))  # first bin reaching the count
        need -= int(cum[bucket]) - int(hist[bucket])
        inside = high == bucket
        hashes, index = hashes[inside], index[inside]
    cut = int(torch.kthvalue(hashes, need).values)
    below = int((hashes < cut).sum())
    return cut, int(index[hashes == cut][need - below - 1])


_RADIX_MIN = 1 << 16  # tied entries above which ``hash_order_cut`` selects by a histogram first


def tie_hashes(seed: int, index: torch.Tensor, threshold: float) -> torch.Tensor:
    """The hash order of entries tied at ``threshold``: ``element_hash``, or 0 for all when the
    cut-off is 0 (tied zeros change no merged value, so index order is enough and costs nothing)."""
    return element_hash(seed, index) if threshold != 0 else torch.zeros(index.shape, dtype=torch.int64)


def dropped_ties(
    tied: torch.Tensor, seed: int, hash_cut: int, index_cut: int, threshold: float = 1.0, hashes: torch.Tensor | None = None
) -> torch.Tensor:
    """Which of the entries tied at ``threshold``, at flat indices ``tied`` (ascending), lie past
    the cut in hash order (``hashes``: their ``element_hash``, when already computed)."""
    if threshold == 0:
        return tied > index_cut
    h = element_hash(seed, tied) if hashes is None else hashes
    return (h > hash_cut) | ((h == hash_cut) & (tied > index_cut))


def compact_index(index: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices into ``n`` elements as int32 when they fit (half the memory of int64)."""
    return index.to(torch.int32) if n <= _I32_MAX else index


_I32_MAX = (1 << 31) - 1


@dataclass
class Trim:
    """Which entries of one tensor each task keeps under top-k: per task t, every |τ_t| above
    ``thresholds[t]``, and of the entries equal to it those up to (``hash_cut[t]``,
    ``index_cut[t]``) in hash order (``ALL_TIES``: all of them, the keep_ties rule; at a
    cut-off of 0 the hash order is the index order, see ``tie_hashes``).
    ``kept[t]`` counts the entries kept (None when not counted).

    ``dropped[t]``, where the trim's passes over the tensor found them (``row_cut``,
    ``coded_trim``, ``tie_cuts`` on one tensor) at a non-zero cut-off: the entries tied at the
    cut-off that task t drops (the ones ``dropped_ties`` picks), as their flat indices
    (ascending, int32 below 2^31), a bool mask of the tensor's elements, or that mask packed
    8 to a byte (uint8, ``mark_bits``). Masks and code splits then read them instead of
    finding and hashing the tied entries again; the trim must then only be applied to that
    tensor."""

    thresholds: torch.Tensor  # [T] fp32
    hash_cut: list[int]
    index_cut: list[int]
    seeds: list[int]
    kept: list[int | None]
    dropped: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask(self, part: torch.Tensor, start: int = 0, zeros: bool = True) -> torch.Tensor:
        """The keep mask ``[T, m]`` of columns ``start:start+m`` of the flat ``[T, n]`` stack.
        ``zeros=False`` keeps every entry tied at a cut-off of 0: which zeros a trim keeps
        changes no sum, sign or disjoint mean, so merges skip them."""
        mag = part.abs()
        keep = mag >= self.thresholds.reshape(-1, 1).to(part.device)
        for t, cut in enumerate(self.hash_cut):
            thr = float(self.thresholds[t])
            if cut < ALL_TIES and (zeros or thr != 0):
                known = self.dropped_in(t, start, start + part.shape[1])
                if known is not None:  # kept on the host: moved with the block's part of it
                    known = known.to(part.device)
                    if known.dtype == torch.bool:
                        keep[t] &= ~known
                    else:
                        keep[t, known] = False
                    continue
                tied = torch.nonzero(mag[t] == thr).squeeze(1)
                if tied.numel():
                    drop = dropped_ties(tied + start, self.seeds[t], cut, self.index_cut[t], thr)
                    keep[t, tied[drop]] = False
        return keep

    def merge_mask(self, part: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``mask`` for merging (``zeros=False``): the same merged values, fewer hashes."""
        return self.mask(part, start, zeros=False)

    def dropped_in(self, t: int, start: int, end: int) -> torch.Tensor | None:
        """Task t's ``dropped`` entries among the elements ``[start, end)``, when known: a bool
        mask of those elements, or their indices from ``start`` (int64)."""
        known = self.dropped.get(t)
        if known is None:
            return None
        if known.dtype == torch.bool:
            return known[start:end]
        if known.dtype == torch.uint8:
            return bits_between(known, start, end)
        return dropped_between(known, start, end)


_BITS = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)


def mark_bits(bits: torch.Tensor, index: torch.Tensor) -> None:
    """Set the bits of the flat indices ``index`` (distinct, not set yet) in ``bits``, a mask
    packed 8 elements to a byte (element i: bit i % 8 of byte i // 8)."""
    if index.numel():
        bits.index_put_((index >> 3,), _BITS[index & 7], accumulate=True)  # distinct bits: the sum is the or


def bits_between(bits: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Elements ``[start, end)`` of a packed mask (``mark_bits``) as bool."""
    first = start >> 3
    unpacked = (bits[first : (end + 7) >> 3].unsqueeze(1) & _BITS) != 0
    return unpacked.reshape(-1)[start - (first << 3) : end - (first << 3)]


def dropped_between(dropped: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The entries of ``dropped`` (ascending flat indices) in ``[start, end)``, from ``start`` (int64)."""
    bounds = torch.searchsorted(dropped, torch.tensor([start, end], dtype=dropped.dtype))
    return dropped[int(bounds[0]) : int(bounds[1])].long() - start


def tied_cut(tied: torch.Tensor, seed: int, threshold: float, need: int, n: int) -> tuple[int, int, torch.Tensor | None]:
    """The hash-order cut among the entries tied at a cut-off (flat indices ``tied``, ascending,
    of a tensor of ``n`` elements) keeping ``need`` of them: (hash cut, index cut, the dropped
    entries for ``Trim.dropped``, None at a cut-off of 0). Each tied entry is hashed once."""
    hashes = tie_hashes(seed, tied, threshold)
    cut, index = hash_order_cut(hashes, tied, need)
    if threshold == 0:
        return cut, index, None
    dropped = tied[dropped_ties(tied, seed, cut, index, threshold, hashes)]
    if dropped.numel() > n // 2:  # more than 2 bytes an element: let masks find and hash them again instead
        return cut, index, None
    return cut, index, compact_index(dropped, n)


def row_cut(row: torch.Tensor, k: int, seed: int, rule: str) -> tuple[torch.Tensor, int, int, int, torch.Tensor | None]:
    """Top-k of one flat row: (threshold, hash cut, index cut, entries kept, dropped tied entries (``Trim.dropped``) or None)."""
    n = row.numel()
    thr = count_threshold(row, k)
    if k >= n or k == 0:
        return thr, ALL_TIES, _ANY_INDEX, min(k, n), None
    mag = row.abs()
    if rule == "keep_ties":
        return thr, ALL_TIES, _ANY_INDEX, int((mag >= thr).sum()), None
    above = int((mag > thr).sum())
    tied = torch.nonzero(mag == thr).squeeze(1)
    del mag
    if tied.numel() == k - above:
        return thr, ALL_TIES, _ANY_INDEX, k, None
    cut, index, dropped = tied_cut(tied, seed, float(thr), k - above, n)
    return thr, cut, index, k, dropped


def cuts_trim(cuts: Sequence[tuple[torch.Tensor, int, int, int, torch.Tensor | None]], seeds: Sequence[int]) -> Trim:
    """The ``Trim`` of per-task ``row_cut`` results."""
    dropped = {t: c[4] for t, c in enumerate(cuts) if c[4] is not None}
    return Trim(torch.stack([c[0] for c in cuts]), [c[1] for c in cuts], [c[2] for c in cuts], list(seeds), [c[3] for c in cuts], dropped)


def row_trim(taus: torch.Tensor, density: float, seeds: Sequence[int], rule: str) -> Trim:
    """Per-row top-``density`` of ``[T, *shape]`` (each row's count is ``keep_count(density, n)``)."""
    flat = taus.reshape(taus.shape[0], -1)
    k = keep_count(density, flat.shape[1])
    return cuts_trim([row_cut(row, k, seed, rule) for row, seed in zip(flat, seeds, strict=True)], seeds)


def trimmed_sum(taus: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ_t τ_t over the kept entries (one scratch buffer for all tasks)."""
    total = torch.zeros(taus.shape[1:], device=taus.device)
    buf = torch.empty_like(total)
    for row, k in zip(taus, keep, strict=True):
        total += torch.where(k, row, _ZERO, out=buf)
    return total


_TIES_CHUNK = 1 << 20  # columns per chunk: T x chunk temporaries instead of T x n

KeepMask = Callable[[torch.Tensor, int], torch.Tensor]  # (flat [T, m] columns, first column) -> bool [T, m]


def ties_merge(taus: torch.Tensor, keep: KeepMask, majority: float | None, aggregate: str = "mean") -> torch.Tensor:
    """TIES on ``[T, *shape]`` with a trim mask (``Trim.mask``): trim, elect the sign by mass
    (exact zeros take ``majority``, or this tensor's majority sign), disjoint mean (or sum).

    Column chunk by column chunk: every element sees the same fp32 operations in the same
    order as whole-tensor code, but the scratch (trim mask, sums, buffers) is a few chunks,
    not ~5 copies of the tensor; the elected sign is kept as int8."""
    flat = taus.reshape(taus.shape[0], -1)
    n = flat.shape[1]
    sign = torch.empty(n, dtype=torch.int8, device=taus.device)
    masks: list[torch.Tensor] = []  # a one-chunk tensor keeps its mask for the second pass
    for start in range(0, n, _TIES_CHUNK):
        part = flat[:, start : start + _TIES_CHUNK]
        mask = keep(part, start)
        masks = [mask] if n <= _TIES_CHUNK else []
        sign[start : start + part.shape[1]] = torch.sign(trimmed_sum(part, mask))
    if majority is None:
        majority = float(torch.sign(sign.sum(dtype=torch.int64)))
    sign[sign == 0] = int(majority)
    out = torch.empty(n, dtype=taus.dtype, device=taus.device)
    for start in range(0, n, _TIES_CHUNK):
        part = flat[:, start : start + _TIES_CHUNK]
        end = start + part.shape[1]
        out[start:end] = disjoint_merge(part, masks[0] if masks else keep(part, start), sign[start:end], aggregate)
    return out.reshape(taus.shape[1:])


def rows_topk(mag: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Bool mask of exactly the ``k`` largest of each row of ``mag`` ``[R, C]`` (0 <= k <= C),
    ties at a row's cut-off broken in hash order of the flat index (row·C + column; index
    order at a cut-off of 0, see ``tie_hashes``)."""
    rows, cols = mag.shape
    if k >= cols:
        return torch.ones(mag.shape, dtype=torch.bool)
    if k == 0:
        return torch.zeros(mag.shape, dtype=torch.bool)
    if not bool(mag.any()):  # τ = 0 (a frozen tensor): every row is cut at 0, in index order
        keep = torch.zeros(mag.shape, dtype=torch.bool)
        keep[:, :k] = True
        return keep
    thr = kth_largest(mag, k, dim=1)
    keep = mag > thr
    need = k - keep.sum(dim=1)
    tied = mag == thr
    short = need < tied.sum(dim=1)  # rows whose ties do not all fit
    keep |= tied & ~short.unsqueeze(1)
    tied &= short.unsqueeze(1)
    index = torch.nonzero(tied.reshape(-1)).squeeze(1)  # ascending: row by row
    if index.numel():
        row = index // cols
        hashed = (thr.reshape(-1) != 0)[row]  # rows cut at 0 keep index order (``tie_hashes``)
        if bool(hashed.any()):
            order_key = row << 32  # (row, hash); the stable sort keeps index order among equal keys
            order_key[hashed] |= element_hash(seed, index[hashed])
            order = torch.sort(order_key, stable=True).indices
            index, row = index[order], row[order]
        first = torch.searchsorted(row, torch.arange(rows))  # where each row's tied entries start
        rank = torch.arange(index.numel()) - first[row]
        keep.view(-1)[index[rank < need[row]]] = True
    return keep


def disjoint_merge(taus: torch.Tensor, keep: torch.Tensor, sign: torch.Tensor, aggregate: str = "mean") -> torch.Tensor:
    """Keep each trimmed τ_t only where it agrees with the elected sign; mean (or sum) over those tasks."""
    total = torch.zeros(sign.shape, dtype=taus.dtype, device=taus.device)
    count = torch.zeros(sign.shape, dtype=torch.int16, device=taus.device)
    buf = torch.empty(sign.shape, dtype=taus.dtype, device=taus.device)
    agree = torch.empty(sign.shape, dtype=torch.bool, device=taus.device)
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
    """Exact k-th largest |x| per row over many ``[rows, ...]`` tensors, in two streaming passes."""
    return global_select(batches, k, rows)[0]


def global_select(batches: Callable[[], Iterable[torch.Tensor]], k: int | torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, over many ``[rows, ...]`` tensors in two streaming passes: the exact k-th
    largest |x| (``k``: one count, or one per row, each in [1, entries]), how many entries
    equal to it the top k takes, and how many there are.

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
    counts = torch.full((rows,), k, dtype=torch.int64) if isinstance(k, int) else k.to(torch.int64)
    bucket, rank = _locate(hi, counts)
    lo = torch.zeros(rows, 1 << 16, dtype=torch.int64)
    for batch in batches():
        for r in range(rows):
            for bits in _abs_bits(batch[r]):
                inside = bits[(bits >> 16) == bucket[r]]
                if inside.numel():
                    lo[r] += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
        del batch
    low, need = _locate(lo, rank)
    tied = lo.gather(1, low.unsqueeze(1)).squeeze(1)
    return ((bucket << 16) | low).to(torch.int32).view(torch.float32), need, tied


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


def drop_(tau: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each entry of ``tau`` (in place) with probability p, from ``generator``'s next draws
    (one per element, on the host, in order): no draws when p ≤ 0, every entry when p ≥ 1."""
    if drop_rate <= 0:
        return tau
    if drop_rate >= 1:
        return tau.zero_()
    return tau.masked_fill_((torch.rand(tau.shape, generator=generator) < drop_rate).to(tau.device), 0.0)


def dare_(tau: torch.Tensor, drop_rate: float, rescale: bool, seed: int) -> torch.Tensor:
    """DARE in place: drop each entry with probability p, rescale survivors by 1/(1-p)."""
    if drop_rate <= 0:
        return tau
    drop_(tau, drop_rate, torch.Generator().manual_seed(seed))
    if rescale and drop_rate < 1:
        tau.div_(1.0 - drop_rate)
    return tau


# a block of every task's elements: a flat [T, m] fp32 stack, or each task's part as read (codes
# or fp32 values): the tie cut then finds the tied entries of a coded part from its codes alone
Block = torch.Tensor | Sequence[CodedTensor | torch.Tensor]
# one pass over the tensors named (None: all): (tensor name, first flat element, block)
Stream = Callable[[Collection[str] | None], Iterable[tuple[str, int, Block]]]


def tied_entries(c: CodedTensor, codes: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Flat indices (ascending) of the elements whose code is one of ``codes`` (one or two: the
    codes of equal |value|), of those in ``[start, end)``."""
    part = c.index[start:end]
    hit = part == int(codes[0])
    for code in codes[1:].tolist():
        hit |= part == code
    where = torch.nonzero(hit).squeeze(1)
    return where.add_(start) if start else where


def tied_at(row: CodedTensor | torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Flat indices (ascending) of one task's entries with |τ| == ``threshold``: from the codes
    alone where the row is coded (no fp32 copy of it), else from its values."""
    if isinstance(row, CodedTensor):
        codes = torch.nonzero(row.table.abs() == threshold).squeeze(1)
        return tied_entries(row, codes) if codes.numel() else torch.empty(0, dtype=torch.int64)
    return torch.nonzero(row.abs() == threshold).squeeze(1)


def tie_cuts(
    stream: Stream, seeds: Callable[[int, str], int], thresholds: torch.Tensor, need: dict[int, int], marks: dict[int, torch.Tensor] | None = None
) -> dict[int, tuple[int, str, int]]:
    """Where the top k of each task t in ``need`` ends among its entries tied at
    ``thresholds[t]`` over every tensor of ``stream``: the ``need[t]``-th in hash order (hash,
    tensor name, flat index) as (hash cut, tensor name, index); at a cut-off of 0 in (tensor
    name, index) order (``tie_hashes``); ``seeds(t, key)`` is task t's ``tie_seed`` of a tensor. Two streaming passes of bounded memory, whatever the
    block size: a 2^16-bin histogram of the hashes' high halves (and the zeros per tensor),
    then the few entries in the bucket that holds the cut (and the zero at the cut: with no
    hashed task, that pass reads only the tensors holding the cuts).

    ``marks``: for a stream of one tensor, a zeroed packed mask of its elements (``mark_bits``)
    per hashed task of ``need``: the second pass marks the entries past the cut in it (those
    of a higher bucket as it goes, those of the cut's bucket at the end), so that the trim's
    masks need not find and hash them again (``Trim.dropped``)."""
    zero = [t for t in need if float(thresholds[t]) == 0]
    hashed = [t for t in need if t not in zero]
    hist = torch.zeros(len(hashed), 1 << 16, dtype=torch.int64)
    zeros: dict[int, dict[str, int]] = {t: {} for t in zero}
    for key, start, block in stream(None):
        for t in zero:
            zeros[t][key] = zeros[t].get(key, 0) + tied_at(block[t], 0.0).numel()
        for j, _, h in _tied_hashes(block, start, key, hashed, seeds, thresholds):
            hist[j] += torch.bincount(h >> 16, minlength=1 << 16)
        del block  # before the next one is read
    zero_at = {t: _zero_rank(zeros[t], need[t]) for t in zero}
    wanted = torch.tensor([need[t] for t in hashed], dtype=torch.int64)
    cum = hist.cumsum(dim=1)
    bucket = torch.searchsorted(cum, wanted.unsqueeze(1)).squeeze(1)  # first bin reaching the count
    rank = wanted - (cum.gather(1, bucket.unsqueeze(1)) - hist.gather(1, bucket.unsqueeze(1))).squeeze(1)
    found: list[list[tuple[list[int], str, list[int]]]] = [[] for _ in hashed]
    cuts: dict[int, tuple[int, str, int]] = {}
    for key, start, block in stream(None if hashed else {at[0] for at in zero_at.values()}):
        for t in zero:
            cut_key, remaining = zero_at[t]
            if key == cut_key and t not in cuts:
                where = tied_at(block[t], 0.0)
                if remaining <= where.numel():
                    cuts[t] = (0, key, start + int(where[remaining - 1]))
                zero_at[t] = (cut_key, remaining - where.numel())
        for j, tied, h in _tied_hashes(block, start, key, hashed, seeds, thresholds):
            high = h >> 16
            inside = high == bucket[j]
            if bool(inside.any()):  # as Python ints: no small tensor lives through the pass (``tvq.heap``)
                found[j].append(((h[inside] & 0xFFFF).tolist(), key, tied[inside].tolist()))
            if marks is not None and hashed[j] in marks:
                mark_bits(marks[hashed[j]], tied[high > bucket[j]])
        del block
    for j, t in enumerate(hashed):
        entries = sorted((int(lo), key, int(i)) for low, key, index in found[j] for lo, i in zip(low, index, strict=True))
        lo, key, index = entries[int(rank[j]) - 1]
        cuts[t] = ((int(bucket[j]) << 16) | lo, key, index)
        if marks is not None and t in marks:
            mark_bits(marks[t], torch.tensor([i for _, _, i in entries[int(rank[j]) :]], dtype=torch.int64))
    return cuts


def _zero_rank(per_key: dict[str, int], need: int) -> tuple[str, int]:
    """The tensor (in name order) holding the ``need``-th zero, and its rank among that tensor's zeros."""
    remaining = need
    key = ""
    for key in sorted(per_key):
        if remaining <= per_key[key]:
            break
        remaining -= per_key[key]
    return key, remaining


def _tied_hashes(
    block: Block, start: int, key: str, rows: list[int], seeds: Callable[[int, str], int], thresholds: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per row j of ``rows``: the flat indices (from ``start``) of the block's entries tied at the
    row's cut-off, and their hashes."""
    for j, t in enumerate(rows):
        tied = tied_at(block[t], thresholds[t])
        if tied.numel():
            tied += start
            yield j, tied, element_hash(seeds(t, key), tied)
