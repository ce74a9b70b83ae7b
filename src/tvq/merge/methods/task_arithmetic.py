"""Task arithmetic (Ilharco et al. 2023): θ = θ_pre + λ Σ_t τ_t; the TVQ paper fixes λ = 0.3.

With mergekit's per-model ``weight`` and ``normalize``: θ = θ_pre + λ Σ_t w_t τ_t (÷ Σ_t w_t
with ``normalize``), which is also mergekit's ``linear`` (Σ_t w_t θ_t / Σ_t w_t) when
``normalize`` is on and λ = 1. Unit weights without ``normalize`` are the plain sum, bit for bit.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tvq.merge.coded import coded_sum
from tvq.merge.ops import task_sum
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method
from tvq.merge.weights import PerTask, linear_fuse, per_task
from tvq.quant.coded import CodedTensor


class TaskArithmeticOptions(MethodOptions):
    lam: float = Field(0.3, alias="lambda", description="scale of the summed task vectors")
    weight: PerTask = Field(1.0, description="weight of each task vector (one value or per task, mergekit's per-model weight)")
    normalize: bool = Field(False, description="divide the weighted sum by the summed weights (a weighted mean)")


@merge_method("task_arithmetic", aliases=("ta",))
class TaskArithmetic(MergeMethod):
    """Sum the (weighted) task vectors and scale once."""

    Options = TaskArithmeticOptions
    options: TaskArithmeticOptions
    elementwise = True
    on_device = True

    def __init__(self, options: TaskArithmeticOptions, tasks: list[str], task: str | None = None) -> None:
        super().__init__(options, tasks, task)
        self.weights = torch.tensor(per_task(self.options.weight, self.tasks, "weight", self.name))
        self.plain = not self.options.normalize and bool((self.weights == 1).all())

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        if self.plain:
            return task_sum(taus).mul_(self.options.lam)
        return linear_fuse(taus, self.weights, self.options.normalize).mul_(self.options.lam)

    def merge_coded(self, key: str, coded: list[CodedTensor]) -> torch.Tensor | None:
        """Σ_t table_t[codes_t] in task order, then × λ: each task's values are gathered from
        its own small table (2^b entries), so no joint index or combination table is needed.
        Weighted sums go through the combination table (the same bytes as the dense stack)."""
        if not self.plain:
            return super().merge_coded(key, coded)
        return coded_sum(coded).mul_(self.options.lam)
