"""Compiled inner loops of TIES from codes (numba): imported only when a merge needs them.

Every element gets exactly the fp32 operations of ``tvq.merge.ops.ties_merge`` under
``Trim.merge_mask``, in the same order: its trimmed values summed over tasks in task order
(float32), the sign of that sum (0: the majority), then the values that agree with it summed
in task order and divided by their count (float32 division). Nothing here is fast-math, so
LLVM neither reassociates nor fuses. The loops run task by task over a cache-sized run of
elements (``RUN``), the layout torch's own loops use, so each inner loop is a table gather
and an add. Integers are int64 (the hash mixer's products stay below 2^63, as in
``tvq.merge.ops._mix32``)."""

from __future__ import annotations

import numba
import numpy as np

RUN = 2048  # elements per run: T x 8 KiB of fp32 scratch
_C1 = np.int64(0x21F0AAAD)
_C2 = np.int64(0x735A2D97)
_M32 = np.int64(0xFFFFFFFF)


@numba.njit(nogil=True, cache=True, inline="always")
def _dropped(flat, lo, high, hash_cut, index_cut):  # pragma: no cover - compiled
    """``dropped_ties`` of one tied entry: its ``element_hash`` past the cut."""
    x = flat ^ lo
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    h = (x ^ (x >> 15)) ^ high
    return h > hash_cut or (h == hash_cut and flat > index_cut)


@numba.njit(nogil=True, cache=True, inline="always")
def _trimmed(codes, tables, tied, lo, high, hash_cut, index_cut, first, count, flat0, vals, total, kept):  # pragma: no cover
    """Each task's trimmed values of elements ``first`` to ``first + count`` into ``vals``
    ``[T, RUN]`` and their sum over tasks, in task order, into ``total``; ``kept[t]`` counts
    the tied entries task t keeps."""
    for i in range(count):
        total[i] = np.float32(0.0)
    for t in range(codes.shape[0]):
        row, table, ties = codes[t], tables[t], tied[t]
        lo_t, high_t, cut_t, index_t = lo[t], high[t], hash_cut[t], index_cut[t]
        out = vals[t]
        for i in range(count):
            c = row[first + i]
            v = table[c]
            if ties[c]:
                if _dropped(flat0 + i, lo_t, high_t, cut_t, index_t):
                    v = np.float32(0.0)
                else:
                    kept[t] += 1
            out[i] = v
            total[i] += v


@numba.njit(nogil=True, cache=True, inline="always")
def _elected(total):  # pragma: no cover - compiled
    """The sign a trimmed sum elects (``ties_merge``'s vote): ±1, 0 for a zero sum (the majority decides)."""
    return 1 if total > 0 else (-1 if total < 0 else 0)


@numba.njit(nogil=True, cache=True)
def ties_votes(codes, tables, tied, lo, high, hash_cut, index_cut, start, kept):  # pragma: no cover
    """Σ over ``codes`` ``[T, m]``'s elements (flat indices from ``start``) of the sign of their
    trimmed sum (``ties_merge``'s vote); adds the tied entries each task keeps to ``kept``."""
    m = codes.shape[1]
    vals = np.empty((codes.shape[0], RUN), dtype=np.float32)
    total = np.empty(RUN, dtype=np.float32)
    votes = 0
    for first in range(0, m, RUN):
        count = min(RUN, m - first)
        _trimmed(codes, tables, tied, lo, high, hash_cut, index_cut, first, count, start + first, vals, total, kept)
        for i in range(count):
            votes += _elected(total[i])
    return votes


@numba.njit(nogil=True, cache=True)
def ties_block(codes, tables, tied, lo, high, hash_cut, index_cut, start, majority, mean, out, pending):  # pragma: no cover
    """Merge ``codes`` ``[T, m]`` (flat indices from ``start``) into ``out`` ``[m]``; returns
    (Σ elected signs, how many elements wait in ``pending``). ``majority`` is +1, -1, 0, or 2
    when not known yet: an element whose trimmed sum is exactly 0 while a task keeps a
    non-zero value then waits (its position in ``pending``) for a second call."""
    n_tasks, m = codes.shape
    vals = np.empty((n_tasks, RUN), dtype=np.float32)
    total = np.empty(RUN, dtype=np.float32)
    sign = np.empty(RUN, dtype=np.float32)  # exactly ±1 or 0, as ties_merge's int8 sign promoted
    count = np.empty(RUN, dtype=np.int32)
    kept = np.zeros(n_tasks, dtype=np.int64)
    votes = 0
    waiting = 0
    for first in range(0, m, RUN):
        run = min(RUN, m - first)
        _trimmed(codes, tables, tied, lo, high, hash_cut, index_cut, first, run, start + first, vals, total, kept)
        for i in range(run):
            elected = _elected(total[i])
            votes += elected
            sign[i] = elected
            if elected == 0:  # a zero sum: the majority's sign, or (unknown) a wait
                if majority != 2:
                    sign[i] = majority
                else:  # sign stays 0 (nothing kept but zeros: +0.0 for either sign) unless a task keeps a value
                    for t in range(n_tasks):
                        if vals[t, i] != 0:
                            pending[waiting] = first + i
                            waiting += 1
                            break
            total[i] = np.float32(0.0)
            count[i] = 0
        for t in range(n_tasks):
            row = vals[t]
            for i in range(run):  # branch-free: adding +0.0 leaves a sum that is never -0.0 unchanged
                v = row[i]
                agree = v * sign[i] > 0
                total[i] += v if agree else np.float32(0.0)
                count[i] += agree
        for i in range(run):
            if mean:
                out[first + i] = total[i] / np.float32(max(count[i], 1))
            else:
                out[first + i] = total[i]
    return votes, waiting


@numba.njit(nogil=True, cache=True, inline="always")
def _trimmed_at(codes, tables, tied, lo, high, hash_cut, index_cut, t, j, flat):  # pragma: no cover - compiled
    """Task t's trimmed value of element ``codes[:, j]`` (flat index ``flat``)."""
    c = codes[t, j]
    if tied[t, c] and _dropped(flat, lo[t], high[t], hash_cut[t], index_cut[t]):
        return np.float32(0.0)
    return tables[t, c]


@numba.njit(nogil=True, cache=True)
def ties_points(codes, tables, tied, lo, high, hash_cut, index_cut, flats, majority, mean, out):  # pragma: no cover
    """``ties_block`` of scattered elements (``codes[:, j]`` is flat index ``flats[j]``), the majority known."""
    n_tasks = codes.shape[0]
    for j in range(codes.shape[1]):
        total = np.float32(0.0)
        for t in range(n_tasks):
            total += _trimmed_at(codes, tables, tied, lo, high, hash_cut, index_cut, t, j, flats[j])
        sign = _elected(total) or majority
        acc = np.float32(0.0)
        kept = 0
        for t in range(n_tasks):
            v = _trimmed_at(codes, tables, tied, lo, high, hash_cut, index_cut, t, j, flats[j])
            if (v > 0 and sign > 0) or (v < 0 and sign < 0):
                acc += v
                kept += 1
        out[j] = acc / np.float32(max(kept, 1)) if mean else acc
