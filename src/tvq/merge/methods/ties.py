"""TIES-Merging (Yadav et al. 2023): trim, elect sign by mass, disjoint mean, scale by λ.

Reference (prateeky2806/ties-merging, also MergeLM and AdaMerging's vision code): each task
vector is flattened over the *whole model* and trimmed to its top-k% magnitudes; the elected
sign is sign(Σ_t τ_t), with exact zeros set to the majority sign of the whole vector; the
merged entry is the mean of the trimmed entries that agree with that sign. ``scope=global``
(default) reproduces that with a streaming pre-pass (exact radix-select threshold, then the
majority sign); ``scope=tensor`` trims and elects per tensor, like mergekit's ``ties``.
One deliberate difference: the reference keeps int(k·n)+1 entries (its kthvalue is off by
one); tvq keeps int(k·n), as the comment in the reference intends and mergekit does.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from tqdm import tqdm

from tvq.merge.coded import (
    combination_values,
    joint_index,
    lookup,
    marginal_counts,
    weighted_kth_largest,
    worth_coding,
)
from tvq.merge.ops import (
    global_kth_largest,
    keep_count,
    row_thresholds,
    ties_keep,
    ties_merge,
    trimmed_sum,
)
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method
from tvq.merge.source import TaskSource
from tvq.quant.coded import CodedTensor


class TiesOptions(MethodOptions):
    density: float = Field(0.2, ge=0, le=1, description="fraction of each task vector kept (top-k by magnitude)")
    lam: float = Field(0.3, alias="lambda", description="scale of the merged vector")
    scope: Literal["global", "tensor"] = Field("global", description="top-k over the whole model (paper) or per tensor (mergekit)")
    aggregate: Literal["mean", "sum"] = Field("mean", description="disjoint mean (paper) or disjoint sum")


class TiesStats:
    """What global TIES needs before streaming: per-task thresholds and the majority sign."""

    def __init__(self, thresholds: torch.Tensor, majority: float) -> None:
        self.thresholds = thresholds
        self.majority = majority

    @classmethod
    def compute(cls, source: TaskSource, density: float, progress: bool = False) -> TiesStats:
        rows = len(source.tasks)
        n = sum(source.numel(k) for k in source.keys)
        k = keep_count(density, n)
        if k >= n:
            thresholds = torch.zeros(rows)
        elif k == 0:
            thresholds = torch.full((rows,), float("inf"))
        else:
            passes = iter(("1/3", "2/3"))

            def batches():
                desc = f"ties: global top-k (pass {next(passes)})"
                return (source.stack(key) for key in tqdm(source.keys, desc=desc, unit="tensor", disable=not progress))

            thresholds = global_kth_largest(batches, k, rows)
        votes = 0.0
        for key in tqdm(source.keys, desc="ties: majority sign (pass 3/3)", unit="tensor", disable=not progress):
            taus = source.stack(key)
            votes += float(torch.sign(trimmed_sum(taus, ties_keep(taus, density, thresholds))).sum())
            del taus  # before the next stack is built
        return cls(thresholds, float(torch.sign(torch.tensor(votes))))


def ties_tensor(taus: torch.Tensor, density: float, stats: TiesStats | None, aggregate: str) -> torch.Tensor:
    """Unscaled TIES merge of one tensor (``taus`` is left unchanged): global thresholds when ``stats`` is given."""
    if stats is not None:
        return ties_merge(taus, stats.thresholds, stats.majority, aggregate)
    return ties_merge(taus, row_thresholds(taus, density), None, aggregate)


@merge_method("ties", aliases=("ties_merging",))
class Ties(MergeMethod):
    Options = TiesOptions
    options: TiesOptions
    stats: TiesStats | None = None

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        if self.options.scope == "global":
            self.stats = TiesStats.compute(source, self.options.density, progress)

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.scope == "global" and self.stats is None:
            raise RuntimeError("global TIES needs prepare() (its pre-pass) before merge_tensor()")
        return ties_tensor(taus, o.density, self.stats, o.aggregate).mul_(o.lam)

    def merge_coded(self, key: str, coded: list[CodedTensor]) -> torch.Tensor | None:
        """TIES once per combination of codes: the per-tensor thresholds (k-th largest |τ̂_t|)
        and majority sign come exactly from code histograms, then ``ties_merge`` runs on the
        combinations, so every element gets the bytes the dense path gives it."""
        if not worth_coding(coded):
            return None
        o = self.options
        if o.scope == "global" and self.stats is None:
            raise RuntimeError("global TIES needs prepare() (its pre-pass) before merge_coded()")
        joint = joint_index(coded)
        combos = combination_values(coded)
        if self.stats is not None:
            thresholds, majority = self.stats.thresholds, self.stats.majority
        else:
            per_combination = torch.bincount(joint, minlength=combos.shape[1])
            thresholds = coded_thresholds(coded, marginal_counts(per_combination, coded), o.density)
            signs = torch.sign(trimmed_sum(combos, combos.abs() >= thresholds.reshape(-1, 1))).to(torch.int64)
            majority = float(torch.sign((signs * per_combination).sum()))
        lut = ties_merge(combos, thresholds, majority, o.aggregate).mul_(o.lam)
        return lookup(lut, joint)


def coded_thresholds(coded: list[CodedTensor], counts: list[torch.Tensor], density: float) -> torch.Tensor:
    """Per task, the |τ̂| an entry needs to be in the top-k: the k-th largest from the code histogram."""
    n = coded[0].index.numel()
    k = keep_count(density, n)
    if k >= n:
        return torch.zeros(len(coded))
    if k == 0:
        return torch.full((len(coded),), float("inf"))
    return torch.stack([weighted_kth_largest(c.table.abs(), count, k) for c, count in zip(coded, counts, strict=True)])
