"""Model Stock (Jang et al., ECCV 2024, "Model Stock: All we need is just a few fine-tuned models").

Per tensor, the fine-tuned models' angle to each other sets how far to move from the
pretrained weights towards their average: t = N·cos θ / (1 + (N − 1)·cos θ) and
θ = t·mean_t θ_t + (1 − t)·θ_pre, i.e. θ_pre + t·mean_t τ_t.

Reference: mergekit ``mergekit/merge_methods/model_stock.py`` (``model_stock_merge_method``
in the 0.1.5 release, ``ModelStockMergeTask`` before), which tvq follows exactly: cos θ is the
mean over all pairs i < j of (τ_i · τ_j) / max(‖τ_i‖·‖τ_j‖, 1e-6), each clamped to [−1, 1],
over the flattened tensor, or per row of the last dimension with ``filter_wise`` (a 1-D
tensor is one row); N is the number of fine-tuned models. It needs at least two task
vectors (mergekit: three models with the base). The 1e-6 floor is mergekit's: a tensor whose
two deltas have norms whose product is below it (tiny biases) gets a smaller cos θ, hence t,
than its true angle. Where |1 + (N − 1)·cos θ| < 1e-6 (anti-aligned fine-tunes) there is no
finite t and θ_pre is kept (t = 0), as in mergekit 0.1.5. tvq works on τ (mergekit on θ), so
the sums differ in rounding only; dot products are accumulated in float64, single-threaded
(the same bytes from every executor). No pre-pass; memory is the ``[T, *shape]`` stack plus one buffer.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tvq.errors import ConfigError
from tvq.merge.ops import task_sum
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method
from tvq.merge.spectral import one_torch_thread


class ModelStockOptions(MethodOptions):
    filter_wise: bool = Field(False, description="one angle per row of the last dimension instead of per tensor (mergekit's filter_wise)")


def stock_ratio(taus: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """t from the pairwise cosines of the task vectors ``[T, *shape]``: a 0-d tensor, or with
    ``filter_wise`` one t per row of the last dimension (``[*shape[:-1], 1]``), ready to broadcast."""
    rows = len(taus)
    per_row = filter_wise and taus.dim() > 1
    flat = taus if per_row else taus.reshape(rows, -1)
    norms = [row.norm(dim=-1, dtype=torch.float64) for row in flat]
    cosines = []
    for i in range(rows):
        for j in range(i + 1, rows):
            dot = (flat[i].double() * flat[j].double()).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (rows - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite ratio: keep θ_pre there (mergekit 0.1.5)
    t = torch.where(singular, 0.0, rows * cos / torch.where(singular, 1.0, denominator)).float()
    return t.unsqueeze(-1) if per_row else t


@merge_method("model_stock")
class ModelStock(MergeMethod):
    """Model Stock: move from θ_pre towards the mean by a ratio set by the task vectors' angle."""

    Options = ModelStockOptions
    options: ModelStockOptions

    def __init__(self, options: ModelStockOptions, tasks: list[str], task: str | None = None) -> None:
        super().__init__(options, tasks, task)
        if len(self.tasks) < 2:
            raise ConfigError("model_stock needs at least two task vectors (the angle between them sets the ratio)")

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        with one_torch_thread():
            t = stock_ratio(taus, self.options.filter_wise)
            return task_sum(taus).div_(len(taus)).mul_(t)
