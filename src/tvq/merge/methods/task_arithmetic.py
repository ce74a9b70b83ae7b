"""Task arithmetic (Ilharco et al. 2023): θ = θ_pre + λ Σ_t τ_t; the TVQ paper fixes λ = 0.3."""

from __future__ import annotations

import torch
from pydantic import Field

from tvq.merge.coded import coded_sum
from tvq.merge.ops import task_sum
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method
from tvq.quant.coded import CodedTensor


class TaskArithmeticOptions(MethodOptions):
    lam: float = Field(0.3, alias="lambda", description="scale of the summed task vectors")


@merge_method("task_arithmetic", aliases=("ta",))
class TaskArithmetic(MergeMethod):
    """Sum the task vectors and scale once."""

    Options = TaskArithmeticOptions
    options: TaskArithmeticOptions
    elementwise = True

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        return task_sum(taus).mul_(self.options.lam)

    def merge_coded(self, key: str, coded: list[CodedTensor]) -> torch.Tensor | None:
        """Σ_t table_t[codes_t] in task order, then × λ: each task's values are gathered from
        its own small table (2^b entries), so no joint index or combination table is needed."""
        return coded_sum(coded).mul_(self.options.lam)
