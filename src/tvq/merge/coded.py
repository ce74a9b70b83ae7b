"""Merging straight from codes: a quantized τ̂ takes only a handful of distinct values.

A b-bit task vector is ``table[codes]`` with a table of 2^b fp32 values (an RTVQ one,
β̂ + ô, has 2^(b_base + b_offset)). For T tasks, the merged value of an element depends
only on its T codes, so an elementwise method (task arithmetic, TIES once its per-tensor
thresholds and majority sign are known) needs to run once per *combination of codes*,
not once per element: 16^4 = 65,536 combinations for four 4-bit tasks against millions
of elements. The method's own code computes that lookup table, the same fp32 operations
in the same order for every combination, so ``lut[joint index]`` is bit-identical to
merging the dequantized tensors; per-tensor statistics (top-k thresholds, the majority
sign) come exactly from code histograms. This is what makes TIES from a pack fast.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from functools import cache
from types import ModuleType
from typing import cast

import numpy as np
import torch

from tvq.quant.coded import CodedTensor

MAX_COMBINATIONS = 1 << 20  # lookup tables up to 4 MiB; beyond that, merge the dense tensors
_CHUNK = 1 << 20
MIN_COMPILED = 1 << 16  # fewer elements keep the torch loop: a small model's merge never imports numba


def combinations(coded: list[CodedTensor]) -> int:
    total = 1
    for c in coded:
        total *= c.values
    return total


def worth_coding(coded: list[CodedTensor]) -> bool:
    """A lookup table pays when it is small and has fewer entries than the tensor has elements."""
    return combinations(coded) <= min(MAX_COMBINATIONS, coded[0].index.numel())


def joint_index(coded: list[CodedTensor]) -> torch.Tensor:
    """Per element, its combination of codes as one int32: c_0·V_1·…·V_{T-1} + … + c_{T-1}."""
    n = coded[0].index.numel()
    out = torch.empty(n, dtype=torch.int32)
    for start in range(0, n, _CHUNK):
        part = out[start : start + _CHUNK]
        part.copy_(coded[0].index[start : start + _CHUNK])
        for c in coded[1:]:
            part.mul_(c.values).add_(c.index[start : start + _CHUNK])
    return out


def combination_values(coded: list[CodedTensor]) -> torch.Tensor:
    """``[T, V_0·…·V_{T-1}]``: row t is task t's value in each combination (joint-index order)."""
    grids = torch.meshgrid(*(c.table for c in coded), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids])


def marginal_counts(per_combination: torch.Tensor, coded: list[CodedTensor]) -> list[torch.Tensor]:
    """Each task's code histogram, summed out of the joint one (no pass over the elements)."""
    grid = per_combination.reshape([c.values for c in coded])
    dims = range(len(coded))
    return [grid.sum(dim=[d for d in dims if d != t]) if len(coded) > 1 else grid for t in dims]


def weighted_kth_largest(values: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of the multiset where ``values[i]`` occurs ``counts[i]`` times (k >= 1)."""
    order = torch.argsort(values, descending=True, stable=True)
    cum = torch.cumsum(counts[order], 0)
    pos = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype)))
    return values[order[pos]]


def lookup(lut: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``lut[index]`` (fp32, flat), gathered chunk by chunk."""
    out = torch.empty(index.numel(), dtype=lut.dtype)
    for start in range(0, index.numel(), _CHUNK):
        torch.index_select(lut, 0, index[start : start + _CHUNK], out=out[start : start + _CHUNK])
    return out


def coded_sum(coded: list[CodedTensor]) -> torch.Tensor:
    """Σ_t τ̂_t in task order (``tvq.merge.ops.task_sum``'s order), gathering each task's values
    from its own table chunk by chunk: the dense sum's bytes without dense task vectors (in one
    compiled loop where numba is installed: the same fp32 adds in the same order)."""
    n = coded[0].index.numel()
    out = torch.empty(n, dtype=torch.float32)
    kernel = _sum_kernel(coded)
    if kernel is not None:
        tables = torch.zeros(len(coded), max(c.values for c in coded), dtype=torch.float32)
        for t, c in enumerate(coded):
            tables[t, : c.values] = c.table
        flat = out.numpy()
        for start in range(0, n, _CHUNK):
            end = min(start + _CHUNK, n)
            kernel(stacked_codes(coded, start, end), tables.numpy(), flat[start:end])
        return out
    buf = torch.empty(min(_CHUNK, n), dtype=torch.float32)
    index = torch.empty(min(_CHUNK, n), dtype=torch.int32)
    for start in range(0, n, _CHUNK):
        end = min(start + _CHUNK, n)
        m = end - start
        for t, c in enumerate(coded):
            idx = index[:m].copy_(c.index[start:end])  # index_select takes int32/int64 indices
            if t == 0:
                torch.index_select(c.table, 0, idx, out=out[start:end])
            else:
                out[start:end] += torch.index_select(c.table, 0, idx, out=buf[:m])
    return out


def _sum_kernel(coded: list[CodedTensor]) -> Callable[..., object] | None:
    """The compiled gather-and-add loop for host codes of at least ``MIN_COMPILED`` elements, or
    None (numba missing, ``TVQ_SUM_KERNEL=torch``, small or device tensors: the torch loop)."""
    if coded[0].index.numel() < MIN_COMPILED or os.environ.get("TVQ_SUM_KERNEL") == "torch":
        return None
    if any(c.index.device.type != "cpu" or c.table.device.type != "cpu" for c in coded):
        return None
    module = _sum_jit()
    return None if module is None else cast(Callable[..., object], module.gather_sum)


@cache
def _sum_jit() -> ModuleType | None:
    """The compiled loop's module (numba imported with it, on first need), or None where numba
    cannot be imported (then the torch loop sums)."""
    try:
        return importlib.import_module("tvq.merge._sum_jit")
    except ImportError:  # pragma: no cover - numba is a dependency
        return None


def stacked_codes(coded: Sequence[CodedTensor], start: int, end: int) -> np.ndarray:
    """Codes ``[start, end)`` of every task as one ``[T, m]`` array (uint8, or int32 when any task's are wider)."""
    dtype = np.uint8 if all(c.index.dtype == torch.uint8 for c in coded) else np.int32
    out = np.empty((len(coded), end - start), dtype=dtype)
    for t, c in enumerate(coded):
        out[t] = c.index[start:end].numpy()
    return out
