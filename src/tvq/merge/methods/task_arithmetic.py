"""Task arithmetic (Ilharco et al. 2023): θ = θ_pre + λ Σ_t τ_t; the TVQ paper fixes λ = 0.3."""

from __future__ import annotations

import torch
from pydantic import Field

from tvq.merge.registry import MergeMethod, MethodOptions, merge_method


class TaskArithmeticOptions(MethodOptions):
    lam: float = Field(0.3, alias="lambda", description="scale of the summed task vectors")


@merge_method("task_arithmetic", aliases=("ta",))
class TaskArithmetic(MergeMethod):
    """Sum the task vectors and scale once."""

    Options = TaskArithmeticOptions
    options: TaskArithmeticOptions
    elementwise = True

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        return taus.sum(dim=0).mul_(self.options.lam)
