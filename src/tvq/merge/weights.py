"""Per-task values of a method's options (mergekit's per-model ``parameters``) and the
weighted sum they feed: ``weight: 0.5`` for every task, or ``weight: {sst2: 1, mnli: 0.5}``."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from tvq.device import divide_
from tvq.errors import ConfigError

PerTask = float | dict[str, float]  # one value for every task, or one per task (naming every task)
Fraction = Annotated[float, Field(ge=0, le=1)]
PerTaskFraction = Fraction | dict[str, Fraction]  # the same, each value in [0, 1]


def per_task(value: PerTask, tasks: list[str], name: str, method: str) -> list[float]:
    """One value per task, in task order; a mapping must name every task exactly."""
    if not isinstance(value, dict):
        return [float(value)] * len(tasks)
    if set(value) != set(tasks):
        raise ConfigError(f"{method}: {name} must name every task exactly ({', '.join(tasks)})")
    return [float(value[t]) for t in tasks]


def linear_fuse(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σ_t w_t δ_t over ``[T, *shape]`` in task order, divided by Σ_t w_t with ``normalize``
    (unless that is ~0, as mergekit)."""
    total = torch.zeros(deltas.shape[1:], device=deltas.device)
    buf = torch.empty_like(total)
    for w, delta in zip(weights.tolist(), deltas, strict=True):
        total += torch.mul(delta, w, out=buf)
    divisor = float(weights.sum())
    if not normalize or abs(divisor) < 1e-8:
        return total
    return divide_(total, divisor)


def elect_and_fuse(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """mergekit's sum consensus on ``[T, *shape]``: elect sign(Σ_t w_t δ_t) (≥ 0 elects +),
    sum the weighted deltas of that sign, divided by the summed weights of those tasks."""
    total = torch.zeros(deltas.shape[1:], device=deltas.device)
    buf = torch.empty_like(total)
    for w, delta in zip(weights.tolist(), deltas, strict=True):
        total += torch.mul(delta, w, out=buf)
    positive = total >= 0
    total.zero_()
    divisor = torch.zeros(deltas.shape[1:], device=deltas.device)
    agree = torch.empty(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    for w, delta in zip(weights.tolist(), deltas, strict=True):
        torch.mul(delta, w, out=buf)
        torch.where(positive, buf > 0, buf < 0, out=agree)
        total += buf.masked_fill_(~agree, 0.0)
        divisor += agree * w
    if not normalize:
        return total
    return total.div_(divisor.masked_fill_(divisor == 0, 1.0))
