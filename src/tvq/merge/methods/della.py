"""DELLA (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling"): MagPrune, then elect and fuse (``della``) or sum (``della_linear``).

MagPrune, per task and tensor: within each row, entries are ranked by |τ| (rank 0 the
smallest, n − 1 the largest) and kept with probability p_keep = (density − ε) + 2ε·rank/(n − 1),
so larger entries are dropped less often; survivors are rescaled by 1/p_keep (= 1/(1 − p_drop),
the paper's rescaling, which keeps E[τ̃] = τ). Then, as mergekit's generalized task arithmetic:
weighted deltas w_t·τ̃_t; ``della`` elects the sign of their sum (a sum ≥ 0 elects +), keeps
each task's entries of that sign and divides their sum by the sum of those tasks' weights
(``normalize``); ``della_linear`` sums the weighted deltas (divided by Σ w_t with
``normalize``). Finally × λ.

References: the authors' code (declare-lab/della ``mergekit/mergekit/sparsify.py``
``rank_magnitude`` and ``generalized_task_arithmetic.py``; upstreamed as mergekit PR #366) and
mergekit ``mergekit/sparsify.py`` ``della_magprune`` with ``merge_methods/registry.py``
(``della``: sum consensus, normalize; ``della_linear``: no consensus, no normalize). Names as
mergekit's: ``density``, ``epsilon``, ``lambda``, ``weight``, ``normalize``, ``rescale``.
Where tvq differs, on purpose:
* Rows are mergekit's: the second dimension is ranked (per row of a matrix); 1-D and 0-d
  tensors are one row. Entries of equal |τ| get the mean of the ranks they span (quantized
  task vectors tie a lot; mergekit's argsort ranks ties in an arbitrary order), and a row of
  one entry is kept with probability ``density`` (mergekit divides by zero there).
* ``rescale_mode=probability`` (default) divides by p_keep as the paper and the authors' code
  do; current mergekit (since v0.1) instead rescales the pruned tensor to its original L1
  norm, which is ``rescale_mode=l1``.
* The random keep mask is seeded per (seed, task, tensor) like DARE's (``tensor_seed``), so it
  does not depend on the order tensors are merged in, on the other tasks, or on the executor;
  mergekit draws from torch's global RNG.
* ``weight``, ``density`` and ``epsilon`` take one value or a value per task, as mergekit's
  per-model ``parameters``. Defaults: the authors' command (README: drop rate 0.3, window
  0.14, λ 1.1, weights 1) for ``della``; ``della_linear`` (not in the paper) uses λ = 0.3 like
  tvq's task arithmetic. mergekit's own defaults are density 1 (no pruning), ε 0.15, λ 1.
Per tensor; memory is the ``[T, *shape]`` stack plus a few tensor-sized buffers (the ranks
are found in row chunks).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from tvq.errors import ConfigError
from tvq.merge.ops import tensor_seed
from tvq.merge.registry import MergeMethod, MethodOptions, merge_method
from tvq.merge.spectral import one_torch_thread
from tvq.merge.weights import PerTask, elect_and_fuse, linear_fuse, per_task

_RANK_CHUNK = 1 << 22  # entries ranked at once: bounds the int64 scratch of the searches


class DellaOptions(MethodOptions):
    density: PerTask = Field(0.7, description="expected fraction kept per task (one value or per task)")
    epsilon: PerTask = Field(0.07, description="half-width of the keep probabilities around density (one value or per task)")
    lam: float = Field(1.1, alias="lambda", description="scale of the merged vector")
    weight: PerTask = Field(1.0, description="weight of each task's delta (one value or per task)")
    normalize: bool = Field(True, description="divide by the summed weights (of the agreeing tasks)")
    rescale: bool = Field(True, description="rescale the pruned deltas (see rescale_mode)")
    rescale_mode: Literal["probability", "l1"] = Field("probability", description="divide by p_keep (paper) or restore the L1 norm (mergekit)")
    seed: int = Field(0, description="base seed; each (task, tensor) derives its own")

    @model_validator(mode="after")
    def _valid_values(self) -> DellaOptions:
        for name in ("density", "epsilon", "weight"):
            value = getattr(self, name)
            for v in value.values() if isinstance(value, dict) else (value,):
                if name == "density" and not 0 <= v <= 1:
                    raise ValueError(f"density must be in [0, 1], got {v}")
                if name == "epsilon" and v < 0:
                    raise ValueError(f"epsilon must be >= 0, got {v}")
        return self


class DellaLinearOptions(DellaOptions):
    lam: float = Field(0.3, alias="lambda", description="scale of the merged vector")
    normalize: bool = Field(False, description="divide by the summed weights")


def keep_probability(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's keep probability of every entry (``tau``'s shape): linear in the rank of
    |τ| within its row, from density − ε (smallest) to density + ε (largest); ties share
    their mean rank."""
    rows = _as_rows(tau)
    n = rows.shape[1]
    probs = torch.empty(rows.shape)
    if n == 1:
        probs.fill_(density)
        return _from_rows(probs, tau)
    mag = rows.abs()
    step = max(1, _RANK_CHUNK // n)
    for start in range(0, rows.shape[0], step):
        part = mag[start : start + step]
        ordered = part.sort(dim=1).values
        below = torch.searchsorted(ordered, part, right=False)  # entries strictly smaller
        upto = torch.searchsorted(ordered, part, right=True)  # entries smaller or equal
        rank = (below + upto - 1).to(torch.float32).div_(2 * (n - 1))  # mean 0-based rank / (n − 1)
        probs[start : start + step] = rank.mul_(2 * epsilon).add_(density - epsilon)
    return _from_rows(probs, tau)


def _as_rows(tau: torch.Tensor) -> torch.Tensor:
    """``[rows, n]`` with n the ranked dimension: mergekit ranks dimension 1 (the whole tensor for 0-d/1-D)."""
    if tau.dim() < 2:
        return tau.reshape(1, -1)
    return tau.movedim(1, -1).reshape(-1, tau.shape[1])


def _from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() < 2:
        return rows.reshape(like.shape)
    moved = list(like.movedim(1, -1).shape)
    return rows.reshape(moved).movedim(-1, 1).contiguous()


def magprune_(tau: torch.Tensor, density: float, epsilon: float, seed: int, rescale: bool, mode: str) -> torch.Tensor:
    """MagPrune one task's tensor in place (mergekit leaves it whole at density ≥ 1 and zeroes it at ≤ 0)."""
    if density >= 1 or tau.numel() == 0:
        return tau
    if density <= 0:
        return tau.zero_()
    probs = keep_probability(tau, density, epsilon)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(tau.shape, generator=gen) < probs
    if rescale and mode == "l1":
        before = tau.abs().sum(dtype=torch.float64)
    tau.masked_fill_(~keep, 0.0)
    if not rescale:
        return tau
    if mode == "probability":
        return tau.div_(probs)
    after = tau.abs().sum(dtype=torch.float64)
    if before < 1e-7 or after < 1e-7:  # mergekit's rescaled_masked_tensor leaves tiny tensors unscaled
        return tau
    return tau.mul_(float(before / after))


@merge_method("della", aliases=("della_ties", "della_merging"))
class Della(MergeMethod):
    """DELLA: MagPrune each task vector, then TIES-style sign election and disjoint weighted mean."""

    Options = DellaOptions
    options: DellaOptions
    consensus = True

    def __init__(self, options: DellaOptions, tasks: list[str], task: str | None = None) -> None:
        super().__init__(options, tasks, task)
        o = self.options
        self.densities = per_task(o.density, self.tasks, "density", self.name)
        self.epsilons = per_task(o.epsilon, self.tasks, "epsilon", self.name)
        self.weights = torch.tensor(per_task(o.weight, self.tasks, "weight", self.name))
        for task_name, d, eps in zip(self.tasks, self.densities, self.epsilons, strict=True):
            if 0 < d < 1 and (d + eps >= 1 or d - eps <= 0):
                raise ConfigError(f"{self.name}: epsilon must keep density ± epsilon inside (0, 1) (task {task_name}: {d} ± {eps})")

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        with one_torch_thread():
            for task, row, d, eps in zip(self.tasks, taus, self.densities, self.epsilons, strict=True):
                magprune_(row, d, eps, tensor_seed(o.seed, task, key), o.rescale, o.rescale_mode)
            fuse = elect_and_fuse if self.consensus else linear_fuse
            return fuse(taus, self.weights, o.normalize).mul_(o.lam)


@merge_method("della_linear")
class DellaLinear(Della):
    """DELLA without the sign election: MagPrune each task vector, weighted sum."""

    Options = DellaLinearOptions
    consensus = False
