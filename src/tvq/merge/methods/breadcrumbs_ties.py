"""Breadcrumbs with TIES's sign election (mergekit's ``breadcrumbs_ties``).

mergekit (``mergekit/merge_methods/registry.py``: ``breadcrumbs_ties`` = ``magnitude_outliers``
sparsification + ``sum`` consensus, normalize off; ``mergekit/sparsify.py``
``magnitude_outliers``): each task vector gets the Breadcrumbs mask (drop the top ``gamma``
fraction by magnitude, keep the next top ``density``), the sign of Σ_t of the masked vectors is
elected per entry, and the masked entries that agree with it are summed (``aggregate=sum``,
mergekit's default, normalize off) or averaged (``aggregate=mean``, mergekit's
``normalize: true`` with unit weights), then scaled by λ.

tvq builds it from its own pieces: the masks are ``tvq.merge.methods.breadcrumbs``'s (so
``scope``, ``tie_rule`` and the other Breadcrumbs options mean the same; ``scope=tensor`` is
mergekit's and the default here), the election and disjoint merge ``tvq.merge.ops.ties_merge``'s
(an exact-zero sum takes the tensor's majority sign where mergekit elects +, which only matters
where the masked values cancel exactly). λ defaults to 0.3 like tvq's ``breadcrumbs``
(mergekit: weights and λ 1); ``density`` 0.1 and ``gamma`` 0.01 as ``breadcrumbs``.
Per-task ``density``, ``gamma`` and ``weight`` (mergekit's per-model parameters): each task is
masked with its own cuts; with weights, the sign of Σ_t w_t τ̃_t is elected (a zero sum elects +,
as mergekit) and the agreeing w_t τ̃_t are summed (``sum``) or divided by their weights (``mean``),
``tvq.merge.weights.elect_and_fuse``. Unit weights keep the path above, bit for bit.
Per tensor; memory is the ``[T, *shape]`` stack plus the TIES chunk buffers.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from tvq.merge.methods.breadcrumbs import Breadcrumbs, BreadcrumbsOptions
from tvq.merge.ops import ties_merge
from tvq.merge.registry import merge_method
from tvq.merge.weights import elect_and_fuse


class BreadcrumbsTiesOptions(BreadcrumbsOptions):
    scope: Literal["row", "tensor"] = Field("tensor", description="cut per tensor (mergekit) or per row (Breadcrumbs code)")
    aggregate: Literal["sum", "mean"] = Field("sum", description="disjoint sum (mergekit's default) or disjoint mean")


def _keep_all(part: torch.Tensor, start: int) -> torch.Tensor:
    """TIES's trim is the Breadcrumbs mask, already applied: keep every entry."""
    return torch.ones(part.shape, dtype=torch.bool)


@merge_method("breadcrumbs_ties", aliases=("model_breadcrumbs_ties",))
class BreadcrumbsTies(Breadcrumbs):
    """Breadcrumbs masks, then TIES's sign election and disjoint sum (or mean)."""

    Options: ClassVar[type[BreadcrumbsOptions]] = BreadcrumbsTiesOptions
    options: BreadcrumbsTiesOptions

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        self.mask_tasks(key, taus)  # Breadcrumbs' own masks (and tie rule)
        if self.weighted:
            return elect_and_fuse(taus, self.weights, o.aggregate == "mean").mul_(o.lam)
        return ties_merge(taus, _keep_all, None, o.aggregate).mul_(o.lam)
