"""Consensus merging with TALL masks (Wang et al. 2024, "Localizing Task Information").

Reference (nik-dim/tall_masks): τ_MTL is the multi-task vector (the plain sum for task
arithmetic, or TIES with top-20 % and a disjoint *sum* for ``base=ties``); each task's TALL
mask is m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t| (the code writes it on θ: |θ_0 − θ_t| > λ_t|θ_MTL − θ_t|,
strictly; tvq uses ≥ as the paper does; TIES's trim follows ``tie_rule`` as in tvq.merge.methods.ties);
the consensus mask keeps entries claimed by at least k tasks (k = 2 drops "catastrophic" and
"selfish" weights), and θ = θ_pre + λ·(mask ⊙ τ_MTL).
The reference picks λ_t per task from {0.2, …, 0.6} on validation data; tvq defaults to 0.4
and accepts one value per task (``mask_lambda: {task: value}``).

By blocks (tvq.merge.blocks): given λ_t (and for ``base=ties`` the global trim and majority
sign from ``prepare``'s pre-pass), every element's mask and value depend only on its T values
(and, for TIES's exact tie rule, its flat index), so tensors larger than a block stream with
no extra pass and the same bytes (τ_MTL of ``base=task_arithmetic`` is ``task_sum``: tasks
added in order, whatever the block).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tvq.errors import ConfigError
from tvq.merge.methods.ties import TiesStats, record_stats
from tvq.merge.ops import TieRule, Trim, task_sum, ties_merge
from tvq.merge.registry import BlockMerger, BlockPasses, MergeMethod, MethodOptions, merge_method, tie_rule_field
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
    block_prepasses = False  # its block merger only carries the global trim: no pass of its own
    on_device = True  # base=ties: TIES's trim from the host, each block's mask made where it merges

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        lam = self.options.mask_lambda
        if isinstance(lam, dict):
            missing = [t for t in self.tasks if t not in lam]
            extra = [t for t in lam if t not in self.tasks]
            if missing or extra:
                raise ConfigError(f"consensus: mask_lambda must name every task exactly ({', '.join(self.tasks)})")
        if self.options.base == "ties":
            self.stats = TiesStats.compute(source, self.options.density, progress, self.options.tie_rule, self.prepass_device)
            record_stats(self, self.stats, source)

    def topk_density(self) -> float | None:
        return self.options.density if self.options.base == "ties" else None

    def _thresholds(self, dim: int) -> torch.Tensor:
        lam = self.options.mask_lambda
        values = [lam[t] for t in self.tasks] if isinstance(lam, dict) else [lam] * len(self.tasks)
        return torch.tensor(values).view(-1, *([1] * dim))

    def _stats(self) -> TiesStats | None:
        if self.options.base == "ties" and self.stats is None:
            raise RuntimeError("consensus with base=ties needs prepare() (TIES's global pre-pass) before merging")
        return self.stats

    def merges_by_blocks(self, key: str, numel: int) -> bool:
        return True  # elementwise once prepare() ran: no extra pass, so every tensor larger than a block streams

    def block_merger(self, key: str, numel: int, passes: BlockPasses) -> BlockMerger:
        stats = self._stats()
        return ConsensusBlocks(self, key, stats.trim(key) if stats is not None else None)

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        stats = self._stats()
        return self.consensus(taus, stats.trim(key) if stats is not None else None)

    def consensus(self, taus: torch.Tensor, trim: Trim | None, start: int = 0) -> torch.Tensor:
        """The merged elements of ``taus`` (``[T, ...]``, a whole tensor or a flat block from
        flat index ``start``); ``trim``: base=ties, the global trim seen from this tensor."""
        o = self.options
        if trim is not None:
            assert self.stats is not None
            mtl = ties_merge(taus, lambda part, at: trim.merge_mask(part, start + at), self.stats.majority, "sum")
        else:
            mtl = task_sum(taus)
        votes = torch.zeros(mtl.shape, dtype=torch.int32, device=mtl.device)
        lam = self._thresholds(mtl.dim()).to(mtl.device)
        for row, lam_t in zip(taus, lam, strict=True):
            votes += row.abs() >= lam_t * (mtl - row).abs()
        return mtl.masked_fill_(votes < o.k, 0.0).mul_(o.lam)


class ConsensusBlocks(BlockMerger):
    """Consensus of one tensor block by block: each block merged as ``Consensus.merge_tensor``
    merges those elements of the whole tensor (TIES's keep mask at the elements' flat indices)."""

    method: Consensus

    def __init__(self, method: Consensus, key: str, trim: Trim | None) -> None:
        super().__init__(method, key)
        self.trim = trim

    def merge_tensor(self, start: int, taus: torch.Tensor) -> torch.Tensor:
        return self.method.consensus(taus, self.trim, start)
