"""DARE (Yu et al. 2024, "Language Models are Super Mario"): drop and rescale, then merge.

Reference (yule-BUAA/MergeLM ``mask_input_with_mask_rate``): each entry of each task vector
is dropped with probability p (Bernoulli) and the survivors are divided by 1 − p; the
sparsified vectors then go to an ordinary merge (``base``: average, task arithmetic or TIES,
with TIES's own trimming as in MergeLM). The random mask is seeded per (seed, task, tensor
name), so the result does not depend on the order tensors are processed in, and a pre-pass
(global TIES) sees exactly the same dropped vectors as the main pass. DARE "alone" on one
task is ``base=task_arithmetic, lambda=1``. mergekit's ``dare_*`` differ: they rescale by the
L1 norm instead of 1/(1−p) (``rescale_mode=l1``) and use torch's global RNG; mergekit's
``dare_ties`` has no TIES trim (``density=1``) and sums by default (``aggregate=sum``).

``drop_rate`` and ``weight`` take one value or one per task (mergekit's per-model ``density``
and ``weight``): each task's mask is still seeded per (seed, task, tensor) and drops at its own
rate; with weights the survivors are fused as mergekit's generalized task arithmetic does,
Σ_t w_t τ̃_t (``task_arithmetic``) or the weighted sign election of
``tvq.merge.weights.elect_and_fuse`` after TIES's trim (``ties``; ``aggregate=mean`` divides by
the agreeing tasks' weights). One drop rate and unit weights are the paths above, bit for bit.

By blocks (tvq.merge.blocks; ``base=task_arithmetic`` or ``average`` with ``rescale_mode=probability``):
``torch.rand`` on the CPU draws one number per element, in order, so a block's drop mask is
the next ``m`` draws of one generator per task seeded as the whole tensor's (``DareBlocks``):
the same mask, and with the tasks added in order (``task_sum``) the same bytes, no extra pass.
``rescale_mode=l1`` (per-tensor L1 norms before and after the drop) and ``base=ties`` (its
top-k of the dropped vectors, whose global pre-pass reads whole transformed tensors) merge
each tensor whole.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from tvq.device import divide_
from tvq.merge.methods.ties import TiesStats, record_stats, task_trim, ties_tensor
from tvq.merge.ops import ChunkSums, TieRule, dare_, drop_, keep_count, task_sum, tensor_seed, tie_seed
from tvq.merge.registry import BlockMerger, BlockPasses, MergeMethod, MethodOptions, merge_method, tie_rule_field
from tvq.merge.source import TaskSource
from tvq.merge.weights import PerTask, PerTaskFraction, elect_and_fuse, linear_fuse, per_task
from tvq.quant.coded import CodedTensor

_TIES_ONLY = ("density", "scope", "tie_rule", "aggregate")
_MASK_CHUNK = 1 << 20  # entries of each task masked at once (weighted DARE+TIES)


class DareOptions(MethodOptions):
    drop_rate: PerTaskFraction = Field(0.9, description="probability p of dropping each entry (one value in [0, 1], or per task)")
    rescale: bool = Field(True, description="rescale the survivors (see rescale_mode)")
    rescale_mode: Literal["probability", "l1"] = Field(
        "probability", description="divide survivors by 1 - p (paper) or restore each tensor's L1 norm (mergekit)"
    )
    seed: int = Field(0, description="base seed; each (task, tensor) derives its own")
    base: Literal["task_arithmetic", "average", "ties"] = Field("task_arithmetic", description="merge applied after DARE")
    lam: float = Field(0.3, alias="lambda", description="scale for task_arithmetic / ties (average uses 1/T)")
    density: float = Field(0.2, ge=0, le=1, description="ties base only: fraction kept by TIES's trim")
    scope: Literal["global", "tensor"] = Field("global", description="ties base only: top-k scope")
    aggregate: Literal["mean", "sum"] = Field("mean", description="ties base only: disjoint mean (paper) or sum (mergekit's normalize: false)")
    tie_rule: TieRule = tie_rule_field()
    weight: PerTask = Field(
        1.0,
        description="weight of each task's dropped vector (one value or per task, mergekit's): Σ w τ̃ "
        "(task_arithmetic), or with ties the sign of Σ w τ̃ elected, then Σ w τ̃ (sum) or ÷ Σ w (mean) over the agreeing tasks",
    )

    @model_validator(mode="after")
    def _options_fit_base(self) -> DareOptions:
        if self.base != "ties":
            for name in _TIES_ONLY:
                if name in self.model_fields_set:
                    raise ValueError(f"option '{name}' only applies with base=ties")
        if self.base == "average" and "lam" in self.model_fields_set:
            raise ValueError("option 'lambda' does not apply with base=average (it uses 1/T)")
        if self.base == "average" and "weight" in self.model_fields_set:
            raise ValueError("option 'weight' does not apply with base=average (use base=task_arithmetic)")
        return self


@merge_method("dare", aliases=("dare_ta", "dare_task_arithmetic"))
class Dare(MergeMethod):
    Options = DareOptions
    options: DareOptions
    stats: TiesStats | None = None
    block_prepasses = None  # rescale_mode=l1 sums over a pass; probability mode carries only the random state
    on_device = True  # the drop masks are drawn on the host, as always, and moved
    blocks_when = "base=task_arithmetic or average"

    def __init__(self, options: DareOptions, tasks: list[str], task: str | None = None) -> None:
        super().__init__(options, tasks, task)
        o = self.options
        self.drop_rates = dict(zip(self.tasks, per_task(o.drop_rate, self.tasks, "drop_rate", self.name), strict=True))
        self.weights = torch.tensor(per_task(o.weight, self.tasks, "weight", self.name))
        self.weighted = not bool((self.weights == 1).all())

    def _drop(self, task: str, key: str, tau: torch.Tensor) -> torch.Tensor:
        o = self.options
        seed = tensor_seed(o.seed, task, key)
        rate = self.drop_rates[task]
        if not (o.rescale and o.rescale_mode == "l1"):
            return dare_(tau, rate, o.rescale, seed)
        sums = ChunkSums(2)  # in fixed chunks: the same bits as the blocks' pre-pass (``DareBlocks``)
        sums.add(0, tau.abs())
        dare_(tau, rate, False, seed)
        sums.add(1, tau.abs())
        scale = l1_scale(*sums.finish().tolist())
        return tau if scale is None else tau.mul_(scale)

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        o = self.options
        if o.base == "ties" and o.scope == "global":
            self.stats = TiesStats.compute(source.with_transform(self._drop), o.density, progress, o.tie_rule)
            record_stats(self, self.stats, source)

    def topk_density(self) -> float | None:
        return self.options.density if self.options.base == "ties" else None

    def runs_on_device(self) -> bool:
        o = self.options  # l1's sums over a tensor would add in another order on a GPU
        return o.base != "ties" and not (o.rescale and o.rescale_mode == "l1")

    def exact_kept(self, key: str, shape: tuple[int, ...]) -> int | None:
        o = self.options
        return keep_count(o.density, math.prod(shape)) if o.scope == "tensor" and o.tie_rule == "exact" else None

    def merges_by_blocks(self, key: str, numel: int) -> bool:
        """Elementwise after the drop (whose draws a block continues): every tensor larger than
        a block streams, but with ``base=ties`` (TIES's statistics of the dropped vectors);
        ``rescale_mode=l1`` first sums |τ_t| and |τ̃_t| in a pass over the blocks."""
        return self.options.base != "ties"

    def block_merger(self, key: str, numel: int, passes: BlockPasses) -> BlockMerger:
        o = self.options
        return DareBlocks(self, key, passes if o.rescale and o.rescale_mode == "l1" else None)

    def fuse(self, taus: torch.Tensor) -> torch.Tensor:
        """``base=average`` or ``task_arithmetic`` of the dropped vectors (tasks added in order)."""
        o = self.options
        if o.base == "average":
            return divide_(task_sum(taus), len(taus))
        if self.weighted:
            return linear_fuse(taus, self.weights, False).mul_(o.lam)
        return task_sum(taus).mul_(o.lam)

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        for task, row in zip(self.tasks, taus, strict=True):
            self._drop(task, key, row)
        if o.base != "ties":
            return self.fuse(taus)
        if o.scope == "global" and self.stats is None:
            raise RuntimeError("DARE+TIES with scope=global needs prepare() before merge_tensor()")
        if self.weighted:
            return self._weighted_ties(key, taus)
        return ties_tensor(taus, o.density, self.stats, o.aggregate, self.tasks, key, o.tie_rule, self).mul_(o.lam)

    def _weighted_ties(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        """TIES's trim of the dropped vectors, then mergekit's weighted sign election and fuse."""
        o = self.options
        if self.stats is not None:
            trim = self.stats.trim(key)
        else:
            trim = task_trim(taus, [o.density] * len(self.tasks), [tie_seed(t, key) for t in self.tasks], o.tie_rule)
            self.record_kept(key, trim.kept, taus[0].numel())
        flat = taus.reshape(taus.shape[0], -1)
        for start in range(0, flat.shape[1], _MASK_CHUNK):
            part = flat[:, start : start + _MASK_CHUNK]
            part.masked_fill_(~trim.merge_mask(part, start), 0.0)
        return elect_and_fuse(taus, self.weights, o.aggregate == "mean").mul_(o.lam)


def l1_scale(before: float, after: float) -> float | None:
    """‖τ_t‖₁ / ‖τ̃_t‖₁, or None (left unscaled) when either is below 1e-7, as mergekit's
    rescaled_masked_tensor leaves tiny tensors."""
    return None if before < 1e-7 or after < 1e-7 else before / after


class DareBlocks(BlockMerger):
    """DARE of one tensor block by block (blocks in order): task t's drop mask continues one
    generator seeded like ``dare_``'s on the whole tensor (one ``torch.rand`` draw per element,
    in order), so every element is dropped and rescaled as in ``Dare.merge_tensor``."""

    method: Dare

    def __init__(self, method: Dare, key: str, l1_passes: BlockPasses | None = None) -> None:
        super().__init__(method, key)
        self.generators = self._fresh_generators()
        self.next = 0
        # rescale_mode=l1: each task's factor ‖τ_t‖₁ / ‖τ̃_t‖₁ from a pass over the blocks (the same draws)
        self.scales = self._l1_scales(l1_passes) if l1_passes is not None else None

    def _fresh_generators(self) -> list[torch.Generator]:
        seed = self.method.options.seed
        return [torch.Generator().manual_seed(tensor_seed(seed, task, self.key)) for task in self.method.tasks]

    def _drop_(self, taus: torch.Tensor, generators: list[torch.Generator]) -> None:
        """Each task's next draws drop its entries of the block (in place), as ``dare_``."""
        for task, row, gen in zip(self.method.tasks, taus, generators, strict=True):
            drop_(row, self.method.drop_rates[task], gen)

    def _l1_scales(self, passes: BlockPasses) -> list[float | None]:
        sums, generators = (ChunkSums(len(self.method.tasks)), ChunkSums(len(self.method.tasks))), self._fresh_generators()
        for _, block in passes.dense():
            for t, row in enumerate(block):
                sums[0].add(t, row.abs())
            self._drop_(block, generators)
            for t, row in enumerate(block):
                sums[1].add(t, row.abs())
        return [l1_scale(b, a) for b, a in zip(sums[0].finish().tolist(), sums[1].finish().tolist(), strict=True)]

    def merge_tensor(self, start: int, taus: torch.Tensor) -> torch.Tensor:
        if start != self.next:
            raise RuntimeError(f"'{self.key}': DARE's blocks must come in order (block at {start}, expected {self.next})")
        self.next = start + taus.shape[1]
        self._drop_(taus, self.generators)
        for task, row, scale in zip(self.method.tasks, taus, self.scales or [None] * len(taus), strict=True):
            rate = self.method.drop_rates[task]
            if self.scales is not None:
                if scale is not None:
                    row.mul_(scale)
            elif self.method.options.rescale and 0 < rate < 1:
                divide_(row, 1.0 - rate)
        return self.method.fuse(taus)

    def merge_coded(self, start: int, coded: list[CodedTensor]) -> torch.Tensor | None:
        return None  # the dense block: the drop is per element


class DareTiesOptions(DareOptions):
    base: Literal["task_arithmetic", "average", "ties"] = Field("ties", description="merge applied after DARE")


@merge_method("dare_ties")
class DareTies(Dare):
    """DARE followed by TIES (MergeLM's mask_merging with ties_merging)."""

    Options = DareTiesOptions
