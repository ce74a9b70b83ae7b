"""The compiled loop of task arithmetic from codes (numba): imported only when a merge needs it.

Each element gets ``tvq.merge.coded.coded_sum``'s fp32 operations in its order: task 0's table
value, then each next task's added in task order (float32 adds, no fast-math, so LLVM neither
reassociates nor fuses). The loop runs task by task over a cache-sized run of elements, so each
inner loop is one table gather and one add."""

from __future__ import annotations

import numba
import numpy as np

RUN = 4096  # elements per run: 16 KiB of fp32 output stays in L1 while every task adds to it


@numba.njit(nogil=True, cache=True)
def gather_sum(codes, tables, out):  # pragma: no cover - compiled
    """``out[i] = tables[0, codes[0, i]] + tables[1, codes[1, i]] + …`` in task order (fp32)."""
    tasks, n = codes.shape
    for first in range(0, n, RUN):
        m = min(RUN, n - first)
        o = out[first : first + m]
        row, table = codes[0, first : first + m], tables[0]
        for i in range(m):
            o[i] = table[row[i]]
        for t in range(1, tasks):
            row, table = codes[t, first : first + m], tables[t]
            for i in range(m):
                o[i] += table[row[i]]
    return np.int64(0)
