"""TIES from codes with many tasks: one compiled pass over each element's T codes.

A lookup table over the combinations of codes (``tvq.merge.coded``) makes TIES from a pack
cheap for a few tasks, but it has ∏ 2^b_t entries: past four 4-bit tasks it no longer fits,
and the dense path (decode every task to fp32, then a dozen full-size tensor operations per
task, twice) made TIES's time jump with T (issue 19: 3.4x from 4 to 8 tasks). Here each
task's codes stay codes: the trim becomes a small table per task (the value a code
contributes when kept, 0 when not; the one or two codes tied at the cut-off are flagged and
the element's hash decides, as ``Trim.merge_mask`` does), and a compiled loop
(``tvq.merge._ties_jit``, numba) gives every element ``ties_merge``'s own fp32 operations in
its order, so the bytes are the dense path's. Linear in T, no fp32 copy of any task vector.

The majority sign (the sign of the sum of every element's elected sign) is counted on the
way; the rare elements it decides (trimmed sum exactly 0, some value kept) wait and are
merged once it is known, so the whole tensor takes one pass.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import TypeVar

import numpy as np
import torch

from tvq.merge.coded import stacked_codes
from tvq.merge.ops import _M32, ALL_TIES, Trim, _mix32_int
from tvq.quant.coded import CodedTensor

CHUNK = 1 << 18  # elements per call of the compiled loop: T x 256 Ki codes stacked (cache-sized for a few tasks)
HASHED_MAX = 1 << 32  # flat indices below it hash as element_hash's 32-bit branch
_UNKNOWN = 2  # the compiled loop's majority for "not known yet"
R = TypeVar("R")


@cache
def _jit() -> ModuleType | None:
    """The compiled loops, or None where numba cannot be imported (then the torch path merges)."""
    try:
        return importlib.import_module("tvq.merge._ties_jit")
    except ImportError:  # pragma: no cover - numba is a dependency
        return None


def usable(coded: Sequence[CodedTensor], start: int = 0) -> bool:
    """Whether these codes (flat indices from ``start``) can merge here: on the host, indices
    below 2^32, numba importable."""
    n = coded[0].index.numel()
    return start + n <= HASHED_MAX and all(c.index.device.type == "cpu" for c in coded) and _jit() is not None


@dataclass(frozen=True)
class CodeTrim:
    """A ``Trim`` as per-task tables over codes: ``values[t, c]`` is code c's value if task t
    keeps it (|value| >= cut-off) else 0; ``tied[t, c]`` flags codes at the cut-off whose
    elements the hash order decides (exact rule, non-zero cut-off)."""

    values: np.ndarray  # [T, V] float32
    tied: np.ndarray  # [T, V] bool
    lo: np.ndarray  # [T] int64: low half of each task's seed
    high: np.ndarray  # [T] int64: the mixed high half
    hash_cut: np.ndarray  # [T] int64
    index_cut: np.ndarray  # [T] int64

    @classmethod
    def of(cls, coded: Sequence[CodedTensor], trim: Trim) -> CodeTrim:
        rows, width = len(coded), max(c.values for c in coded)
        values = np.zeros((rows, width), dtype=np.float32)
        tied = np.zeros((rows, width), dtype=np.bool_)
        for t, c in enumerate(coded):
            thr = trim.thresholds[t]
            mag = c.table.abs()
            values[t, : c.values] = torch.where(mag >= thr, c.table, 0.0).numpy()
            if trim.hash_cut[t] < ALL_TIES and float(thr) != 0:  # zeros: no value changes (``Trim.merge_mask``)
                tied[t, : c.values] = (mag == thr).numpy()
        seeds = trim.seeds
        return cls(
            values,
            tied,
            np.array([s & _M32 for s in seeds], dtype=np.int64),
            np.array([_mix32_int((s >> 32) & _M32) for s in seeds], dtype=np.int64),
            np.array(trim.hash_cut, dtype=np.int64),
            np.array(trim.index_cut, dtype=np.int64),
        )

    def args(self) -> tuple[np.ndarray, ...]:
        return self.values, self.tied, self.lo, self.high, self.hash_cut, self.index_cut


def _spans(n: int) -> list[tuple[int, int]]:
    return [(at, min(at + CHUNK, n)) for at in range(0, n, CHUNK)]


def _map(fn: Callable[[tuple[int, int]], R], spans: list[tuple[int, int]]) -> list[R]:
    """``fn`` over the spans on torch's thread count (the compiled loops release the GIL)."""
    workers = min(torch.get_num_threads(), len(spans))
    if workers <= 1:
        return [fn(span) for span in spans]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, spans))


def coded_votes(coded: Sequence[CodedTensor], trim: CodeTrim, start: int = 0, kept: np.ndarray | None = None) -> int:
    """Σ of the elected signs of these elements (flat indices from ``start``): ``block_votes``.
    ``kept`` (int64 ``[T]``) gets the tied entries each task keeps (the codes ``trim`` flags)."""
    jit = _jit()
    assert jit is not None

    def votes(span: tuple[int, int]) -> tuple[int, np.ndarray]:
        counts = np.zeros(len(coded), dtype=np.int64)
        return int(jit.ties_votes(stacked_codes(coded, *span), *trim.args(), start + span[0], counts)), counts

    results = _map(votes, _spans(coded[0].index.numel()))
    if kept is not None:
        for _, counts in results:
            kept += counts
    return sum(v for v, _ in results)


def coded_ties(coded: Sequence[CodedTensor], trim: CodeTrim, majority: float | None, mean: bool, start: int = 0) -> torch.Tensor:
    """Unscaled TIES of these elements (flat fp32; flat indices from ``start``) with ``majority``,
    or, when None, the majority sign of these elements themselves (the whole tensor's):
    ``ties_merge(τ̂, trim.merge_mask, majority, aggregate)``, byte for byte."""
    jit = _jit()
    assert jit is not None
    n = coded[0].index.numel()
    out = torch.empty(n, dtype=torch.float32)
    flat = out.numpy()
    known = _UNKNOWN if majority is None else int(majority)

    def merge(span: tuple[int, int]) -> tuple[int, np.ndarray]:
        begin, end = span
        pending = np.empty(end - begin, dtype=np.int64)
        votes, waiting = jit.ties_block(stacked_codes(coded, begin, end), *trim.args(), start + begin, known, mean, flat[begin:end], pending)
        return int(votes), pending[:waiting] + begin

    results = _map(merge, _spans(n))
    waiting = np.concatenate([p for _, p in results]) if results else np.empty(0, dtype=np.int64)
    if waiting.size:  # decided by the majority sign, now known
        sign = int(np.sign(sum(v for v, _ in results)))
        index = torch.from_numpy(waiting)
        codes = np.stack([c.index[index].numpy().astype(np.int32) for c in coded])
        part = np.empty(waiting.size, dtype=np.float32)
        jit.ties_points(codes, *trim.args(), waiting + start, sign, mean, part)
        flat[waiting] = part
    return out
