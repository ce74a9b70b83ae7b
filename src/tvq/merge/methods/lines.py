"""LiNeS (Wang et al. 2025): scale task vectors by depth, α + β·l/(L−1) for block l of L.

Reference (wang-kee/LiNeS; AIM-SKKU/TVQ ``main_lines.py``): keys inside residual block l get
α + β·l/(L−1), every other key (embeddings, stem, final norm, heads) gets α; the scaled
vectors are summed and added with coefficient 1. The TVQ paper uses α = 1/T, β = 0.5. TVQ's
code hard-codes L = 24 (right for ViT-L/14, wrong for ViT-B/32); here L is the real number of
blocks, read from the tensor names: a block stack is a name prefix followed by an integer
index (``encoder.layer.3.``, ``visual.transformer.resblocks.11.``, ``model.layers.0.``), and
each stack (e.g. an encoder and a decoder) gets its own L. ``num_blocks`` overrides L.
A key's scale comes from the names alone, so tensors larger than a block merge by blocks
(tvq.merge.blocks) with the same bytes: the tasks are added in order (``task_sum``), not in
torch's reduction order, which changes with the tensor's size.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from pydantic import Field

from tvq.errors import ConfigError
from tvq.merge.ops import task_sum
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method
from tvq.merge.source import TaskSource


class LinesOptions(MethodOptions):
    alpha: float | None = Field(None, description="scale of the first block and of non-block tensors (default 1/T)")
    beta: float = Field(0.5, description="extra scale reached by the last block")
    num_blocks: int | None = Field(None, ge=2, description="override L (default: counted from the tensor names)")


def block_of(key: str) -> tuple[str, int] | None:
    """(stack prefix, block index) from the first integer component of a tensor name."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


def depth_scales(keys: list[str], alpha: float, beta: float, num_blocks: int | None = None) -> dict[str, float]:
    """Per key: α + β·l/(L−1) inside a block stack (≥ 2 blocks), α elsewhere."""
    found = {k: block_of(k) for k in keys}
    stacks: dict[str, set[int]] = defaultdict(set)
    for hit in found.values():
        if hit is not None:
            stacks[hit[0]].add(hit[1])
    depth = {prefix: (num_blocks or max(idx) + 1) for prefix, idx in stacks.items() if len(idx) >= 2}
    scales = {}
    for key, hit in found.items():
        if hit is None or hit[0] not in depth:
            scales[key] = alpha
            continue
        L = depth[hit[0]]
        if hit[1] >= L:
            raise ConfigError(f"lines: tensor '{key}' is in block {hit[1]}, beyond num_blocks={L}")
        scales[key] = alpha + beta * hit[1] / (L - 1)
    return scales


@merge_method("lines")
class Lines(MergeMethod):
    Options = LinesOptions
    options: LinesOptions
    scales: dict[str, float]
    on_device = True

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        o = self.options
        alpha = o.alpha if o.alpha is not None else 1.0 / len(self.tasks)
        self.scales = depth_scales(source.keys, alpha, o.beta, o.num_blocks)

    def merges_by_blocks(self, key: str, numel: int) -> bool:
        return True  # elementwise given the key's scale: every tensor larger than a block streams

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        return task_sum(taus).mul_(self.scales[key])
