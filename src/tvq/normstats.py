"""Running statistics of normalization layers: found by name and by module structure, re-estimated on data.

BatchNorm's ``running_mean`` / ``running_var`` (and every layer's equivalents) describe the
activations a network saw, not what it learned: adding or trimming them like task-vector
entries gives statistics that match no network (issue 14). tvq therefore stores them exactly
per task in packs, never feeds them to a merge method, and lets the user choose them
(``tvq merge --norm-stats``, ``tvq.merge.statistics``) or re-estimate them on data here.

Detection is one rule everywhere: a tensor name (``tvq.quant.selection.is_statistic``: the
buffer names of PyTorch, Keras, MXNet and Flax norm layers), plus, where the model is at hand
as a module, every buffer of a normalization module (``_NormBase``: BatchNorm1d/2d/3d,
SyncBatchNorm, InstanceNorm with ``track_running_stats``, their Lazy forms and subclasses such
as timm's BatchNormAct2d) whatever its name. No model list is involved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from tvq.quant.selection import is_statistic

__all__ = ["is_statistic", "module_statistic_keys", "norm_layers", "reestimate_norm_stats", "statistic_keys"]


def norm_layers(module: nn.Module) -> dict[str, _NormBase]:
    """Every normalization layer of ``module`` that keeps running statistics, by its name."""
    return {
        name: m
        for name, m in module.named_modules(remove_duplicate=False)
        if isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None
    }


def module_statistic_keys(module: nn.Module) -> list[str]:
    """State-dict keys of the buffers of normalization layers (running mean/var, batch counts),
    from the module structure, whatever they are named. Non-persistent buffers are not in a
    state dict and not listed."""
    in_state = set(module.state_dict(keep_vars=True))
    keys: list[str] = []
    for name, layer in module.named_modules(remove_duplicate=False):
        if not isinstance(layer, _NormBase):
            continue
        for buffer, _ in layer.named_buffers(prefix=name, recurse=False):
            if buffer in in_state and buffer not in keys:
                keys.append(buffer)
    return keys


def statistic_keys(keys: Iterable[str], module: nn.Module | None = None) -> list[str]:
    """Which of ``keys`` are running statistics: by name, and by ``module``'s structure when given."""
    structural = set(module_statistic_keys(module)) if module is not None else set()
    return [k for k in keys if k in structural or is_statistic(k)]


_NONE = object()


def _default_forward(module: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)


@torch.no_grad()
def reestimate_norm_stats(
    module: nn.Module,
    batches: Iterable[Any],
    momentum: float | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> int:
    """Reset the running statistics of every normalization layer of ``module`` and recompute
    them from forward passes over ``batches`` (unlabeled inputs of the tasks); no gradient.

    Only the normalization layers run in train mode (dropout and everything else stay in eval
    mode); weights are never touched. ``momentum=None`` (default) makes each layer keep the
    cumulative moving average, the plain mean over all batches of the per-batch statistics, so
    the order of the batches does not matter; a float uses that exponential momentum instead.
    ``forward(module, batch)`` runs one batch (default: ``module(batch)``, ``module(*batch)``
    for a tuple, ``module(**batch)`` for a dict). Every mode and momentum is restored
    afterwards, even on an error. Returns the number of layers re-estimated (0 without any).
    """
    layers = norm_layers(module)
    if not layers:
        return 0
    stream = iter(batches)
    first = next(stream, _NONE)
    if first is _NONE:  # refused before the statistics are reset
        raise ValueError("reestimate_norm_stats: no batches to estimate the running statistics on")
    run = forward or _default_forward
    modes = {id(m): m.training for m in module.modules()}
    momenta = {id(m): m.momentum for m in layers.values()}
    module.eval()
    try:
        for layer in layers.values():
            layer.reset_running_stats()
            layer.momentum = momentum
            layer.train()
        run(module, first)
        for batch in stream:
            run(module, batch)
    finally:
        for m in module.modules():
            m.train(modes.get(id(m), False))
        for layer in layers.values():
            layer.momentum = momenta[id(layer)]
    return len(set(map(id, layers.values())))
