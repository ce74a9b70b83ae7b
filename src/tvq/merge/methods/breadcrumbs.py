"""Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest outliers and the small noise.

Reference (rezazzr/breadcrumbs ``TaskVectorMiddleKeep``, remove_first=True): per row of each
weight (its last dimension), zero the top ``gamma`` fraction by magnitude, then keep the top
``density`` fraction of what is left; 0-d tensors are kept whole. The masked task vectors
are summed and scaled by λ. ``scope=tensor`` applies the same two cuts to the whole tensor,
which is what mergekit's ``breadcrumbs`` (magnitude_outliers) does.

Ties at the cuts (``tie_rule``, see tvq.merge.ops): ``exact`` (default) orders each row's
entries by |τ| (descending), then hash order of the flat index, then the index, and keeps
ranks int(gamma·n)+1 … int(gamma·n)+int(density·n) exactly: the reference's counts (it uses
``torch.topk``, which picks among tied entries in an unspecified order), deterministically.
``keep_ties`` is tvq's earlier rule, ``>=`` at both cut-offs (every entry tied with the
outlier cut-off is removed, every entry tied with the keep cut-off kept).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from tvq.merge.ops import TieRule, kth_largest, rows_topk, tie_seed
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method, tie_rule_field


class BreadcrumbsOptions(MethodOptions):
    density: float = Field(0.1, ge=0, le=1, description="fraction kept after removing the outliers")
    gamma: float = Field(0.01, ge=0, le=1, description="fraction of largest magnitudes removed")
    lam: float = Field(0.3, alias="lambda", description="scale of the summed masked vectors")
    scope: Literal["row", "tensor"] = Field("row", description="cut per row (reference code) or per tensor (mergekit)")
    tie_rule: TieRule = tie_rule_field()


def _rows(tau: torch.Tensor, scope: str) -> torch.Tensor:
    return tau.reshape(-1, tau.shape[-1]) if scope == "row" else tau.reshape(1, -1)


def breadcrumbs_keep(tau: torch.Tensor, density: float, gamma: float, scope: str, tie_rule: str, seed: int) -> torch.Tensor:
    """The entries of one task-vector tensor Breadcrumbs keeps (bool, ``tau``'s shape): not in the
    top-gamma, in the next top-density. ``seed``: the exact rule's tie-break (``tie_seed``)."""
    if tau.dim() == 0 or tau.numel() == 0:
        return torch.ones(tau.shape, dtype=torch.bool)
    mag = _rows(tau, scope).abs()
    n = mag.shape[1]
    top = int(gamma * n)
    keep = int(density * n)
    if tie_rule == "exact":
        kept = rows_topk(mag, min(top + keep, n), seed)
        if top > 0:
            kept &= ~rows_topk(mag, top, seed)
        return kept.reshape(tau.shape)
    kept = torch.ones(mag.shape, dtype=torch.bool)
    if top > 0:
        outliers = mag >= kth_largest(mag, top, dim=1)
        mag.masked_fill_(outliers, 0.0)
        kept &= ~outliers
    if keep == 0:
        kept.zero_()
    elif keep < n:
        kept &= mag >= kth_largest(mag, keep, dim=1)
    return kept.reshape(tau.shape)


def breadcrumbs_(tau: torch.Tensor, density: float, gamma: float, scope: str, tie_rule: str = "keep_ties", seed: int = 0) -> torch.Tensor:
    """Mask one task-vector tensor in place: remove top-gamma, keep the next top-density."""
    return tau.masked_fill_(~breadcrumbs_keep(tau, density, gamma, scope, tie_rule, seed), 0.0)


@merge_method("breadcrumbs", aliases=("model_breadcrumbs",))
class Breadcrumbs(MergeMethod):
    Options = BreadcrumbsOptions
    options: BreadcrumbsOptions

    def topk_density(self) -> float | None:
        return self.options.density

    def trims(self, key: str, shape: tuple[int, ...]) -> bool:
        return len(shape) > 0 and math.prod(shape) > 0

    def exact_kept(self, key: str, shape: tuple[int, ...]) -> int | None:
        o = self.options
        if o.tie_rule != "exact":
            return None
        rows, n = (math.prod(shape[:-1]), shape[-1]) if o.scope == "row" else (1, math.prod(shape))
        return rows * (min(int(o.gamma * n) + int(o.density * n), n) - int(o.gamma * n))

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        kept = []
        for task, row in zip(self.tasks, taus, strict=True):
            keep = breadcrumbs_keep(row, o.density, o.gamma, o.scope, o.tie_rule, tie_seed(task, key))
            row.masked_fill_(~keep, 0.0)
            kept.append(int(keep.sum()))
        if self.trims(key, tuple(taus.shape[1:])):
            self.record_kept(key, kept, taus[0].numel())
        return taus.sum(dim=0).mul_(o.lam)
