"""Per-tensor sensitivity from data: the diagonal Fisher information of each fine-tuned model.

Bit allocation (``tvq quantize --budget-bits --sensitivity FILE``) weighs each tensor's
squared quantization error by how much the loss cares about that tensor. The diagonal
Fisher F_i = E[(∂ log p(y|x) / ∂θ_i)²] is the standard second-order proxy: an error e in
θ costs about ½ Σ F_i e_i² in expected log-likelihood. We take it where task t's error
matters — at task t's fine-tuned model, on task t's validation examples, with per-example
gradients (no mini-batch averaging, which would shrink it) — average it over each tensor's
elements, normalise per task so every task counts equally, and average over tasks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tvq.bench.model import collate
from tvq.io.atomic import atomic_file

if TYPE_CHECKING:  # the run is passed in; evaluate imports this module
    from tvq.bench.evaluate import BenchRun


def task_fisher(run: BenchRun, task: str, split: str = "validation", examples: int = 32, seed: int = 0) -> dict[str, float]:
    """Mean per-element diagonal Fisher of each trained tensor of task ``task``'s fine-tuned model.

    One backward pass per example, with the label drawn from the model's own predictive
    distribution (a Monte Carlo estimate of the true Fisher, unbiased; per-tensor means over
    thousands of elements make it stable). Tensors frozen during fine-tuning are skipped:
    their task vectors are zero and cost nothing to store.
    """
    bench = run.task(task)
    ids = bench.token_ids(split)[:examples]
    examples_ = [collate([x], bench.tokenizer.pad_token_id) for x in ids]
    return empirical_fisher(run.load_model(run.finetuned_path(task)), run.config.freeze, examples_, bench.logits_of, seed)


def empirical_fisher(
    model: nn.Module, freeze: Sequence[str], examples: Sequence[Any], logits_of: Callable[[nn.Module, Any], torch.Tensor], seed: int = 0
) -> dict[str, float]:
    """Mean per-element diagonal Fisher of each parameter of ``model`` not matched by a
    ``freeze`` pattern, over ``examples`` (one-example batches; ``logits_of(model, batch)``
    gives their logits), with labels drawn from the model's predictive distribution. Shared
    by the suites."""
    frozen = tuple(freeze)
    params = {k: p for k, p in model.named_parameters() if not any(f in k for f in frozen)}
    for k, p in model.named_parameters():
        p.requires_grad_(k in params)
    gen = torch.Generator().manual_seed(seed)
    sums = {k: torch.zeros((), dtype=torch.float64) for k in params}
    for batch in examples:
        log_probs = F.log_softmax(logits_of(model, batch)[0].float(), dim=-1)
        y = int(torch.multinomial(log_probs.detach().exp(), 1, generator=gen))
        grads = torch.autograd.grad(log_probs[y], list(params.values()), allow_unused=True)
        for k, g in zip(params, grads, strict=True):
            if g is not None:
                sums[k] += g.double().pow(2).sum()
    n = max(len(examples), 1)
    return {k: float(s) / n / params[k].numel() for k, s in sums.items()}


def diagonal_fisher(run: BenchRun, split: str = "validation", examples: int = 32, progress: bool = True) -> dict[str, float]:
    """Per-tensor weights, mean 1 over parameters, averaged over the run's tasks."""
    numel = {k: v.numel() for k, v in run.load_model().state_dict().items() if v.is_floating_point()}
    total: dict[str, float] = {k: 0.0 for k in numel}
    for task in tqdm(run.tasks, desc="diagonal Fisher", unit="task", disable=not progress):
        fisher = run.task_fisher(task, split, examples)  # the suite's own per-task Fisher
        scale = sum(numel[k] for k in fisher) / max(sum(fisher[k] * numel[k] for k in fisher), 1e-30)
        for k, v in fisher.items():
            total[k] += v * scale / len(run.tasks)
    # tensors without gradients (buffers) keep the neutral weight 1
    return {k: (total[k] if total[k] > 0 else 1.0) for k in numel}


def write_sensitivity(weights: dict[str, float], path: str | Path) -> Path:
    """The JSON that ``tvq quantize --sensitivity`` reads: {tensor name: weight}."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(weights, indent=1, sort_keys=True))
    return path
