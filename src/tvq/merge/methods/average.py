"""Weight averaging (model soup): θ = mean_t θ_t = θ_pre + mean_t τ_t."""

from __future__ import annotations

import torch

from tvq.merge.registry import MergeMethod, merge_method


@merge_method("average", aliases=("weight_averaging", "average_merging"))
class Average(MergeMethod):
    """The uniform mean of the fine-tuned models; no options."""

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        return taus.mean(dim=0)
