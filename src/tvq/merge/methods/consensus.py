"""Consensus merging with TALL masks (Wang et al. 2024, "Localizing Task Information").

Reference (nik-dim/tall_masks): τ_MTL is the multi-task vector (the plain sum for task
arithmetic, or TIES with top-20 % and a disjoint *sum* for ``base=ties``); each task's TALL
mask is m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t| (the code writes it on θ: |θ_0 − θ_t| > λ_t|θ_MTL − θ_t|,
strictly; tvq uses ≥ as the paper does; TIES's trim follows ``tie_rule`` as in tvq.merge.methods.ties);
the consensus mask keeps entries claimed by at least k tasks (k = 2 drops "catastrophic" and
"selfish" weights), and θ = θ_pre + λ·(mask ⊙ τ_MTL).
The reference picks λ_t per task from {0.2, …, 0.6} on validation data; tvq defaults to 0.4
and accepts one value per task (``mask_lambda: {task: value}``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tvq.errors import ConfigError
from tvq.merge.methods.ties import TiesStats, record_stats, ties_tensor
from tvq.merge.ops import TieRule
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method, tie_rule_field
from tvq.merge.source import TaskSource


class ConsensusOptions(MethodOptions):
    k: int = Field(2, ge=0, description="minimum number of tasks whose TALL mask keeps an entry")
    mask_lambda: float | dict[str, float] = Field(0.4, description="TALL-mask threshold λ_t (one value or per task)")
    lam: float = Field(0.3, alias="lambda", description="scale of the masked multi-task vector")
    base: Literal["task_arithmetic", "ties"] = Field("task_arithmetic", description="how τ_MTL is built")
    density: float = Field(0.2, ge=0, le=1, description="ties base only: fraction kept by TIES's trim")
    tie_rule: TieRule = tie_rule_field()


@merge_method("consensus", aliases=("tall_masks", "consensus_merging", "consensus_ta"))
class Consensus(MergeMethod):
    Options = ConsensusOptions
    options: ConsensusOptions
    stats: TiesStats | None = None

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        lam = self.options.mask_lambda
        if isinstance(lam, dict):
            missing = [t for t in self.tasks if t not in lam]
            extra = [t for t in lam if t not in self.tasks]
            if missing or extra:
                raise ConfigError(f"consensus: mask_lambda must name every task exactly ({', '.join(self.tasks)})")
        if self.options.base == "ties":
            self.stats = TiesStats.compute(source, self.options.density, progress, self.options.tie_rule)
            record_stats(self, self.stats, source)

    def topk_density(self) -> float | None:
        return self.options.density if self.options.base == "ties" else None

    def _thresholds(self, dim: int) -> torch.Tensor:
        lam = self.options.mask_lambda
        values = [lam[t] for t in self.tasks] if isinstance(lam, dict) else [lam] * len(self.tasks)
        return torch.tensor(values).view(-1, *([1] * dim))

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        mtl = ties_tensor(taus, o.density, self.stats, "sum", self.tasks, key, o.tie_rule) if o.base == "ties" else taus.sum(dim=0)
        votes = torch.zeros(mtl.shape, dtype=torch.int32)
        lam = self._thresholds(mtl.dim())
        for row, lam_t in zip(taus, lam, strict=True):
            votes += row.abs() >= lam_t * (mtl - row).abs()
        return mtl.masked_fill_(votes < o.k, 0.0).mul_(o.lam)
