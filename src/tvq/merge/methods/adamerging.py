"""AdaMerging, applied: θ = θ_pre + Σ_t λ_{l,t} τ_{l,t} with coefficients learned beforehand.

Learning needs a model and unlabeled data, so it lives in ``tvq.merge.adamerging`` (Python);
this method streams the merge from the saved coefficients file, like any other method.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from tvq.errors import ConfigError
from tvq.merge.adamerging import AdaMergingResult
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method
from tvq.merge.source import TaskSource


class AdaMergingOptions(MethodOptions):
    coefficients: Path = Field(description="JSON written by tvq.merge.adamerging(...).save(path)")


@merge_method("adamerging", aliases=("ada_merging",))
class AdaMerging(MergeMethod):
    Options = AdaMergingOptions
    options: AdaMergingOptions
    table: dict[str, torch.Tensor]

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        learned = AdaMergingResult.load(self.options.coefficients)
        if sorted(learned.tasks) != sorted(self.tasks):
            raise ConfigError(
                f"{self.options.coefficients}: coefficients are for tasks {', '.join(learned.tasks)}, "
                f"but the merge has {', '.join(self.tasks)}"
            )
        order = [learned.tasks.index(t) for t in self.tasks]
        for key in source.keys:
            if key not in learned.coefficients:
                raise ConfigError(f"{self.options.coefficients}: no coefficients for tensor '{key}'")
        self.table = {k: learned.coefficients[k][order].clamp(0.0, 1.0) for k in source.keys}

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        c = self.table[key].view(-1, *([1] * (taus.dim() - 1)))
        return taus.mul_(c).sum(dim=0)
