"""Weight averaging (model soup): θ = mean_t θ_t = θ_pre + mean_t τ_t."""

from __future__ import annotations

import torch

from tvq.device import divide_
from tvq.merge.ops import task_sum
from tvq.merge.registry import MergeMethod, merge_method


@merge_method("average", aliases=("weight_averaging", "average_merging"))
class Average(MergeMethod):
    """The uniform mean of the fine-tuned models; no options."""

    elementwise = True
    on_device = True

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        return divide_(task_sum(taus), len(taus))  # summed in task order, then divided, like tvq average
