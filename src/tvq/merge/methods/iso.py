"""Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces").

Reference (danielm1405/iso-merging ``src/utils/iso.py``, defaults from ``config/method/
iso_c.yaml`` / ``iso_cts.yaml``; FusionBench's ``ISO_C_Merge`` / ``ISO_CTS_Merge``), for every
2-D tensor whose name has no ``text_projection`` (every other tensor is the mean of the task
vectors):

* **Iso-C**: Δ = Σ_t τ_t = U S Vᵀ; δ = U · mean(S) · Vᵀ (a flat, "isotropic" spectrum).
* **Iso-CTS**: with r = min(m, n) and f = ``common_space_fraction`` (0.8):
  c = int(r·f), then c = r − round((r − c)/T)·T so the rest divides by T, and d = (r − c)/T.
  The common subspace is the top-c left singular vectors U_c of Σ_t τ_t (with their S, V);
  each task contributes the top-d singular triplets of τ_t − U_c U_cᵀ τ_t (its part outside
  the common subspace). U = [task blocks, U_c], S and V likewise; U and V are orthogonalised
  (polar factors) and δ = polar(U) · mean(S) · polar(V).

The merged vector is scaled by α (``lambda``): the reference picks α on validation data from
(0, 3] (31-point grid); FusionBench defaults to 1.0 (and shows 1.5 for ViT-B/32 and L/14),
tvq to 1.0. Python's round() is used as in the reference (halves to even); where that would
give the tasks more than r directions in all (f near 0), d is rounded down instead.

Memory: each 2-D task vector is needed dense (the ``[T, m, n]`` stack the engine streams)
plus about four matrix-sized buffers for the decompositions. SVDs run single-threaded
(``tvq.merge.spectral``): use ``--threads N`` to merge N matrices at once.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tvq.merge.methods.tsv import SpectralMethod, SpectralOptions
from tvq.merge.ops import task_sum
from tvq.merge.registry import merge_method
from tvq.merge.spectral import polar

MEMORY_NOTE = "SVD per 2-D tensor: each task's matrix dense plus ~4 matrix-sized buffers; single-threaded SVDs (use --threads)"


def iso_c_mean(taus: torch.Tensor) -> torch.Tensor:
    """Iso-C's non-matrix tensors: Σ_t τ_t / T (the reference's ``sum(tvs) / len(tvs)``)."""
    return task_sum(taus).div_(len(taus))


def iso_c_matrix(taus: torch.Tensor) -> torch.Tensor:
    """Iso-C of one ``[T, m, n]`` stack (unscaled): the task sum with its singular values
    flattened to their mean (the sum is formed as the reference does: (Σ_t τ_t / T)·T)."""
    u, s, vh = torch.linalg.svd(iso_c_mean(taus).mul_(len(taus)), full_matrices=False)
    return (u * s.mean()) @ vh


def iso_cts_split(r: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common directions c, directions per task d) with c + T·d = r, as the reference sizes them."""
    common = int(r * fraction)
    per_task = round((r - common) / tasks)
    if per_task * tasks > r:  # only for fractions near 0: the reference would overrun its buffers
        per_task = r // tasks
    return r - per_task * tasks, per_task


def iso_cts_matrix(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """Iso-CTS of one ``[T, m, n]`` stack (unscaled)."""
    rows, m, n = taus.shape
    r = min(m, n)
    common, d = iso_cts_split(r, rows, fraction)
    u, s, vh = torch.linalg.svd(task_sum(taus), full_matrices=False)
    u_c = u[:, :common].clone()
    u_all = torch.zeros(m, r)
    s_all = torch.zeros(r)
    v_all = torch.zeros(r, n)
    u_all[:, rows * d :] = u_c
    s_all[rows * d :] = s[:common]
    v_all[rows * d :] = vh[:common]
    del u, s, vh
    if d > 0:
        for t, tau in enumerate(taus):
            specific = tau - u_c @ (u_c.T @ tau)  # τ_t without its part in the common subspace
            u_t, s_t, vh_t = torch.linalg.svd(specific, full_matrices=False)
            u_all[:, t * d : (t + 1) * d] = u_t[:, :d]
            s_all[t * d : (t + 1) * d] = s_t[:d]
            v_all[t * d : (t + 1) * d] = vh_t[:d]
            del specific, u_t, s_t, vh_t
    return (polar(u_all) * s_all.mean()) @ polar(v_all)


@merge_method("iso_c", aliases=("iso", "isotropic", "iso_c_merge"))
class IsoC(SpectralMethod):
    """Iso-C: the task-arithmetic sum of every matrix with an isotropic (flat) spectrum."""

    note = MEMORY_NOTE

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return iso_c_matrix(taus)

    def merge_other(self, taus: torch.Tensor) -> torch.Tensor:
        return iso_c_mean(taus)


class IsoCtsOptions(SpectralOptions):
    common_space_fraction: float = Field(0.8, ge=0, le=1, description="fraction of the singular directions kept for the common subspace")


@merge_method("iso_cts", aliases=("iso_cts_merge",))
class IsoCts(SpectralMethod):
    """Iso-CTS: a common subspace of the task sum plus task-specific directions, isotropic."""

    Options = IsoCtsOptions
    options: IsoCtsOptions
    note = MEMORY_NOTE

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return iso_cts_matrix(taus, self.options.common_space_fraction)
