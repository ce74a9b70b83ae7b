"""MagMax (Marczak et al. 2024): per parameter, the task-vector entry of largest magnitude.

Reference (danielm1405/magmax ``merge_max_abs``): tasks are scanned in order with ``>=``, so
on equal magnitudes the later task wins; the merged vector is applied with λ = 0.5.
Each element depends only on its T values, so tensors larger than a block merge by blocks
(tvq.merge.blocks) with the same bytes and no extra pass.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tvq.merge.registry import MergeMethod, MethodOptions, merge_method


class MagMaxOptions(MethodOptions):
    lam: float = Field(0.5, alias="lambda", description="scale of the max-magnitude vector")


@merge_method("magmax")
class MagMax(MergeMethod):
    Options = MagMaxOptions
    options: MagMaxOptions
    on_device = True

    def merges_by_blocks(self, key: str, numel: int) -> bool:
        return True  # elementwise: every tensor larger than a block streams

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        last = taus.shape[0] - 1
        idx = last - taus.abs().flip(0).argmax(dim=0, keepdim=True)  # last task among the maxima
        return taus.gather(0, idx).squeeze(0).mul_(self.options.lam)
