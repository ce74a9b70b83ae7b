"""Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest outliers and the small noise.

Reference (rezazzr/breadcrumbs ``TaskVectorMiddleKeep``, remove_first=True): per row of each
weight (its last dimension), zero the top ``gamma`` fraction by magnitude, then keep the top
``density`` fraction of what is left; 0-d tensors are kept whole. The masked task vectors
are summed and scaled by λ. ``scope=tensor`` applies the same two cuts to the whole tensor,
which is what mergekit's ``breadcrumbs`` (magnitude_outliers) does.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tvq.merge.ops import kth_largest
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method


class BreadcrumbsOptions(MethodOptions):
    density: float = Field(0.1, ge=0, le=1, description="fraction kept after removing the outliers")
    gamma: float = Field(0.01, ge=0, le=1, description="fraction of largest magnitudes removed")
    lam: float = Field(0.3, alias="lambda", description="scale of the summed masked vectors")
    scope: Literal["row", "tensor"] = Field("row", description="cut per row (reference code) or per tensor (mergekit)")


def breadcrumbs_(tau: torch.Tensor, density: float, gamma: float, scope: str) -> torch.Tensor:
    """Mask one task-vector tensor in place: remove top-gamma, keep the next top-density."""
    if tau.dim() == 0 or tau.numel() == 0:
        return tau
    rows = tau.reshape(-1, tau.shape[-1]) if scope == "row" else tau.reshape(1, -1)
    n = rows.shape[1]
    mag = rows.abs()
    top = int(gamma * n)
    if top > 0:
        outliers = mag >= kth_largest(mag, top, dim=1)
        rows.masked_fill_(outliers, 0.0)
        mag.masked_fill_(outliers, 0.0)
    keep = int(density * n)
    if keep == 0:
        rows.zero_()
    elif keep < n:
        rows.masked_fill_(mag < kth_largest(mag, keep, dim=1), 0.0)
    return tau


@merge_method("breadcrumbs", aliases=("model_breadcrumbs",))
class Breadcrumbs(MergeMethod):
    Options = BreadcrumbsOptions
    options: BreadcrumbsOptions

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        for row in taus:
            breadcrumbs_(row, o.density, o.gamma, o.scope)
        return taus.sum(dim=0).mul_(o.lam)
