"""What the SVD merges (TSV-Merge, Iso-C, Iso-CTS) share: which tensors are matrices, the
orthogonal polar factor, the reference's running mean, and a fixed thread count.

The SVD methods decompose every 2-D task vector, so they need it dense (the engine streams
one tensor at a time, so that is one matrix per task) plus a few matrix-sized buffers for the
decompositions. MKL's SVD and matrix products, and torch's reductions, change their last
bits with the number of threads (measured: a 256 x 256 SVD differs between 1 and 2 threads),
while ``--threads N`` runs torch single-threaded and the serial path with torch's default
count. So these computations run single-threaded wherever they run (``one_torch_thread``):
the same bytes from every executor. Throughput comes from merging several tensors at once
(``--threads``, Ray), not from threads inside one decomposition.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch

from tvq.execute import one_torch_thread

__all__ = ["is_matrix", "one_torch_thread", "polar", "running_mean"]

# What the reference code (TSV's TSVM_utils, iso-merging's iso.py) decomposes: 2-D tensors
# whose name does not contain "text_projection"; everything else is averaged.
DEFAULT_EXCLUDE = ["*text_projection*"]


def is_matrix(key: str, shape: Sequence[int], exclude: Sequence[str]) -> bool:
    """A 2-D tensor whose name matches none of the ``exclude`` glob patterns."""
    return len(shape) == 2 and not any(fnmatchcase(key, pattern) for pattern in exclude)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U Vᵀ of ``x`` (the nearest matrix with orthonormal columns
    or rows: the references' "orthogonalize" step, a Procrustes solution)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def running_mean(taus: torch.Tensor) -> torch.Tensor:
    """mean_t τ_t the way both references average non-matrix tensors:
    m ← τ_0, then m ← m + (τ_i − m)/(i + 1)."""
    mean = taus[0].clone()
    for i, row in enumerate(taus[1:], start=1):
        mean += (row - mean) / (i + 1)
    return mean
