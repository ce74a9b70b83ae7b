"""AdaMerging (Yang et al. 2024): learn merge coefficients by entropy minimisation on unlabeled data.

Layer-wise AdaMerging: one coefficient λ_{l,t} per (parameter tensor, task), initialised at
0.3, clamped to [0, 1] in every forward, θ_l = θ_pre,l + Σ_t λ_{l,t} τ_{l,t}; the loss is the
mean Shannon entropy of the predictions on unlabeled batches of each task; Adam, lr 1e-3,
betas (0.9, 0.999). The original sums the task losses and takes one step per iteration; the
TVQ code takes one step per task (``step_per_task=True``). The model is run with
``torch.func.functional_call`` on the merged parameters, so the user's module is never
modified. Unlike every other method this one needs the whole model and all task vectors in
memory. The learned coefficients are saved as JSON and applied (streaming) by the
``adamerging`` merge method: ``tvq merge --method adamerging --coefficients FILE``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from tvq.errors import ConfigError, where
from tvq.vector import TaskVector

FORMAT = "tvq-adamerging"
Run = Callable[..., Any]


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch (AdaMerging's ``softmax_entropy``)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def default_forward(run: Run, task: str, batch: Any) -> torch.Tensor:
    """Call the merged model on a batch: a tuple is positional args, a mapping keyword args."""
    if isinstance(batch, tuple):
        return run(*batch)
    if isinstance(batch, Mapping):
        return run(**batch)
    return run(batch)


@dataclass
class AdaMergingResult:
    """Learned coefficients, key -> ``[T]`` in [0, 1] (tasks in ``tasks`` order)."""

    tasks: list[str]
    coefficients: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        data = {"format": FORMAT, "tasks": self.tasks, "coefficients": {k: v.tolist() for k, v in self.coefficients.items()}}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> AdaMergingResult:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            tasks = list(data["tasks"])
            coeffs = {k: torch.tensor(v, dtype=torch.float32) for k, v in data["coefficients"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{where(p)}: not a readable AdaMerging coefficients file ({exc})") from None
        for key, c in coeffs.items():
            if c.shape != (len(tasks),):
                raise ConfigError(f"{where(p, key)}: {c.numel()} coefficients for {len(tasks)} tasks")
            if not bool(torch.isfinite(c).all()):
                raise ConfigError(f"{where(p, key)}: coefficients must be finite numbers")
        return cls(tasks, coeffs)


def adamerging(
    module: nn.Module,
    task_vectors: Mapping[str, TaskVector],
    batches: Callable[[str, int], Any],
    *,
    forward: Callable[[Run, str, Any], torch.Tensor] = default_forward,
    loss: Callable[[torch.Tensor], torch.Tensor] = entropy_loss,
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    granularity: Literal["layer", "task"] = "layer",
    step_per_task: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> AdaMergingResult:
    """Learn coefficients for merging ``task_vectors`` into ``module`` (which holds θ_pre).

    ``batches(task, step)`` returns one unlabeled batch of that task; ``forward(run, task,
    batch)`` returns logits, where ``run(*args, **kwargs)`` calls the merged model (pass a
    custom ``forward`` to add per-task heads). Parameters without a task vector stay at θ_pre.
    """
    tasks = list(task_vectors)
    if not tasks:
        raise ConfigError("adamerging: no task vectors")
    params = dict(module.named_parameters())
    tv_keys = list(next(iter(task_vectors.values())))
    keys = [k for k in tv_keys if k in params]
    if not keys:
        raise ConfigError("adamerging: no task-vector tensor is a parameter of the module")
    base = {k: params[k].detach() for k in keys}
    taus = {k: torch.stack([tv[k].to(base[k]) for tv in task_vectors.values()]) for k in keys}
    raw = nn.Parameter(torch.full((len(keys) if granularity == "layer" else 1, len(tasks)), float(init)))
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def merged() -> dict[str, torch.Tensor]:
        lam = raw.clamp(0.0, 1.0)
        out = {}
        for i, k in enumerate(keys):
            row = lam[i if granularity == "layer" else 0].to(base[k].dtype)
            out[k] = base[k] + (row.view(-1, *([1] * base[k].dim())) * taus[k]).sum(dim=0)
        return out

    def task_loss(p: dict[str, torch.Tensor], task: str, step: int) -> torch.Tensor:
        def run(*args: Any, **kwargs: Any) -> Any:
            return functional_call(module, p, args, kwargs, strict=False)

        return loss(forward(run, task, batches(task, step)))

    losses: list[float] = []
    for step in range(steps):
        if step_per_task:
            total = 0.0
            for task in tasks:
                optimizer.zero_grad()
                value = task_loss(merged(), task, step)
                value.backward()
                optimizer.step()
                total += float(value.detach())
        else:
            optimizer.zero_grad()
            p = merged()
            value = torch.stack([task_loss(p, task, step) for task in tasks]).sum()
            value.backward()
            optimizer.step()
            total = float(value.detach())
        losses.append(total)
        if callback is not None:
            callback(step, total)

    lam = raw.detach().clamp(0.0, 1.0)
    coeffs = {k: lam[i if granularity == "layer" else 0].clone() for i, k in enumerate(keys)}
    for k in tv_keys:  # buffers and other non-parameters are not learned: they keep the prior
        coeffs.setdefault(k, torch.full((len(tasks),), float(init)))
    return AdaMergingResult(tasks, coeffs, losses)
