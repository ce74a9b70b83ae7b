"""TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference
in Model Merging"): per matrix, each task keeps its top 1/T singular components; the
concatenated singular vectors are orthogonalised (whitened) before reconstruction.

Reference (AntoAndGar/task_singular_vectors ``src/utils/TSVM_utils.py``
``compute_and_sum_svd_mem_reduction``, the same in FusionBench's ``TaskSingularVectorMerging``),
for every 2-D tensor whose name has no ``text_projection``:
  τ_t = U_t S_t V_tᵀ (reduced SVD, r = min(m, n) components), k = ⌊r/T⌋;
  U = [U_1[:, :k] … U_T[:, :k] 0] (m × r), S = [S_1[:k] … S_T[:k] 0], V likewise (r × n);
  δ = polar(U) · diag(S) · polar(Vᵀ), with polar(X) = P Qᵀ from X = P Σ Qᵀ (Procrustes);
every other tensor is the mean of the task vectors. The merged vector is scaled by α
(``lambda``): the reference picks α on validation data from (0, 3] (31-point grid);
FusionBench's default (no α) is 1.0, which is tvq's default.

One deliberate difference: a matrix with fewer singular values than tasks (r < T, e.g. a
4-class head merged from 8 tasks) gets k = 0 components per task in the reference, i.e. a
zero update; tvq averages it like the non-matrix tensors instead.

Memory: each 2-D task vector is needed dense (the engine streams one tensor, so that is the
``[T, m, n]`` stack) plus about five matrix-sized buffers (the per-task SVD, the concatenated
U and V and their polar factors) while one matrix is merged. The SVDs run single-threaded
(``tvq.merge.spectral``): use ``--threads N`` to merge N matrices at once.
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Literal

import torch
from pydantic import Field

from tvq.merge.registry import MergeMethod, MethodOptions, merge_method
from tvq.merge.source import TaskSource
from tvq.merge.spectral import DEFAULT_EXCLUDE, is_matrix, one_torch_thread, polar, running_mean

MEMORY_NOTE = "SVD per 2-D tensor: each task's matrix dense plus ~5 matrix-sized buffers; single-threaded SVDs (use --threads)"


class SpectralKernelsWarning(UserWarning):
    """An SVD method averages >2-D weights (conv kernels) as its reference does."""


class SpectralOptions(MethodOptions):
    """Options every SVD merge shares: the final scale and which 2-D tensors are not decomposed."""

    lam: float = Field(1.0, alias="lambda", description="scale α of the merged task vector")
    exclude_keys: list[str] = Field(DEFAULT_EXCLUDE, description="glob patterns of 2-D tensors averaged instead of decomposed")
    kernels: Literal["average", "flatten"] = Field(
        "average",
        description="conv kernels and other >2-D weights: average them (the references: a CNN then merges as weight averaging) "
        "or decompose each as an (out, in·k·k) matrix",
    )


def tsv_matrix(taus: torch.Tensor) -> torch.Tensor:
    """TSV-Merge of one ``[T, m, n]`` stack of task matrices (unscaled)."""
    rows, m, n = taus.shape
    r = min(m, n)
    k = r // rows  # the reference's int(s.shape[0] * (1 / T)): the same for every T <= 20, r < 5000 (checked)
    if k == 0:
        return running_mean(taus)
    u_all = torch.zeros(m, r)
    s_all = torch.zeros(r)
    v_all = torch.zeros(r, n)
    for t, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        u_all[:, t * k : (t + 1) * k] = u[:, :k]
        s_all[t * k : (t + 1) * k] = s[:k]
        v_all[t * k : (t + 1) * k] = vh[:k]
        del u, s, vh
    return (polar(u_all) * s_all) @ polar(v_all)


class SpectralMethod(MergeMethod):
    """A per-matrix SVD method: ``merge_matrix`` for the 2-D tensors it covers, ``merge_other``
    (the mean) for the rest, both scaled by λ. SVDs run on one torch thread: MKL's results
    change in their last bits with the thread count, and merged bytes must not."""

    Options: ClassVar[type[SpectralOptions]] = SpectralOptions
    options: SpectralOptions
    note = MEMORY_NOTE

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        """Say so when the model's kernels will be averaged: on a CNN that is most of it."""
        o = self.options
        kernels = [k for k in source.keys if len(source.shape(k)) > 2]
        if o.kernels == "average" and kernels:
            warnings.warn(
                f"{self.name}: {len(kernels)} conv kernels or other >2-D weights (e.g. {kernels[0]}) are averaged, as the reference "
                "code does; kernels=flatten decomposes them as (out, in·k·k) matrices, which merged a CNN 5-7 points better "
                "(docs/merging.md)",
                SpectralKernelsWarning,
                stacklevel=2,
            )

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge_other(self, taus: torch.Tensor) -> torch.Tensor:
        return running_mean(taus)

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        shape = taus.shape[1:]
        kernel = o.kernels == "flatten" and len(shape) > 2 and is_matrix(key, (shape[0], shape[1:].numel()), o.exclude_keys)
        with one_torch_thread():
            if kernel:  # an (out, in, k, k) kernel as the (out, in·k·k) matrix it applies
                merged = self.merge_matrix(taus.reshape(taus.shape[0], shape[0], -1)).reshape(shape)
            elif is_matrix(key, shape, o.exclude_keys):
                merged = self.merge_matrix(taus)
            else:
                merged = self.merge_other(taus)
        return merged.mul_(o.lam)


@merge_method("tsv_merge", aliases=("tsv", "tsv_m", "tsvm", "task_singular_vectors"))
class TsvMerge(SpectralMethod):
    """TSV-Merge: per matrix, the top 1/T singular components of every task, whitened."""

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return tsv_matrix(taus)
