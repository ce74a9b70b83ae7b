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

``density``, ``gamma`` and ``weight`` take one value or one per task (mergekit's per-model
``parameters``): each task is masked with its own cuts, and weights give Σ_t w_t τ̃_t (mergekit's
generalized task arithmetic without ``normalize``) before λ. One density and gamma and unit
weights are the path above, bit for bit.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from pydantic import Field

from tvq.merge.ops import TieRule, kth_largest, rows_topk, tie_seed
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method, tie_rule_field
from tvq.merge.source import TaskSource
from tvq.merge.weights import PerTask, PerTaskFraction, linear_fuse, per_task


class BreadcrumbsRowsWarning(UserWarning):
    """Per-row Breadcrumbs keeps nothing of tensors whose rows are shorter than 1/density."""


class BreadcrumbsOptions(MethodOptions):
    density: PerTaskFraction = Field(0.1, description="fraction kept after removing the outliers (one value in [0, 1], or per task)")
    gamma: PerTaskFraction = Field(0.01, description="fraction of largest magnitudes removed (one value in [0, 1], or per task)")
    lam: float = Field(0.3, alias="lambda", description="scale of the summed masked vectors")
    scope: Literal["row", "tensor"] = Field("row", description="cut per row (reference code) or per tensor (mergekit)")
    tie_rule: TieRule = tie_rule_field()
    weight: PerTask = Field(1.0, description="weight of each task's masked vector (one value or per task, mergekit's): λ Σ w τ̃")


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

    def __init__(self, options: BreadcrumbsOptions, tasks: list[str], task: str | None = None) -> None:
        super().__init__(options, tasks, task)
        o = self.options
        self.densities = per_task(o.density, self.tasks, "density", self.name)
        self.gammas = per_task(o.gamma, self.tasks, "gamma", self.name)
        self.weights = torch.tensor(per_task(o.weight, self.tasks, "weight", self.name))
        self.weighted = not bool((self.weights == 1).all())
        self.uniform = len(set(self.densities)) == 1 and len(set(self.gammas)) == 1  # one pair of cuts for every task

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        """Say so when the reference's per-row cut keeps nothing: a conv kernel's rows hold k
        entries (1, 3, 5), so int(density·k) is 0 and a CNN merges as its pretrained model."""
        if self.options.scope != "row":
            return
        empty = [k for k in source.keys if len(shape := source.shape(k)) > 0 and math.prod(shape) > 0
                 and int(max(self.densities) * shape[-1]) == 0]  # fmt: skip
        if empty:
            example = empty[0]
            warnings.warn(
                f"{self.name}: {len(empty)} of {len(source.keys)} tensors (e.g. {example}, rows of {source.shape(example)[-1]}) keep "
                "no entry: the reference cuts each row of the last dimension and keeps int(density·n) of its n entries; "
                "scope=tensor cuts per tensor (mergekit's rule)",
                BreadcrumbsRowsWarning,
                stacklevel=2,
            )

    def topk_density(self) -> float | None:
        return sum(self.densities) / len(self.densities)

    def trims(self, key: str, shape: tuple[int, ...]) -> bool:
        return len(shape) > 0 and math.prod(shape) > 0

    def exact_kept(self, key: str, shape: tuple[int, ...]) -> int | None:
        o = self.options
        if o.tie_rule != "exact" or not self.uniform:
            return None
        density, gamma = self.densities[0], self.gammas[0]
        rows, n = (math.prod(shape[:-1]), shape[-1]) if o.scope == "row" else (1, math.prod(shape))
        return rows * (min(int(gamma * n) + int(density * n), n) - int(gamma * n))

    def mask_tasks(self, key: str, taus: torch.Tensor) -> None:
        """Each task's Breadcrumbs mask, with its own density and gamma, applied in place (and counted)."""
        o = self.options
        kept = []
        for task, row, density, gamma in zip(self.tasks, taus, self.densities, self.gammas, strict=True):
            keep = breadcrumbs_keep(row, density, gamma, o.scope, o.tie_rule, tie_seed(task, key))
            row.masked_fill_(~keep, 0.0)
            kept.append(int(keep.sum()))
        if self.trims(key, tuple(taus.shape[1:])):
            self.record_kept(key, kept, taus[0].numel())

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        self.mask_tasks(key, taus)
        if self.weighted:
            return linear_fuse(taus, self.weights, False).mul_(self.options.lam)
        return taus.sum(dim=0).mul_(self.options.lam)
