"""BatchNorm running statistics of a model rebuilt from tensors: found by module structure, re-estimated on data.

Running means and variances are statistics of the activations, not weights: averaging or
trimming them as task-vector entries gives statistics that match no network (issue 14). The
vision suite therefore never evaluates merged statistics by default: it re-estimates them on
unlabeled images, the same way for every method and precision (see ``VisionConfig.bn_stats``).

The detection and the re-estimation are tvq's own (``tvq.normstats``, which ``tvq merge`` and
the packs use too); this module keeps the suite's names for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tvq.normstats import norm_layers, reestimate_norm_stats, statistic_keys

STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
__all__ = ["STAT_BUFFERS", "norm_layers", "reestimate", "stat_keys", "with_stats_from"]


def stat_keys(module: nn.Module) -> list[str]:
    """State-dict keys of running statistics: by module structure (and by name), in state-dict order."""
    return statistic_keys(module.state_dict(keep_vars=True), module)


def reestimate(module: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]) -> int:
    """Reset every norm layer's statistics and recompute them as the plain average over ``batches``
    (``tvq.normstats.reestimate_norm_stats`` with momentum None: the order of batches does not
    matter; only the norm layers in train mode; weights untouched). Returns the number of layers."""
    return reestimate_norm_stats(module, batches, None, forward=forward)


def with_stats_from(state: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state`` with the running statistics ``keys`` replaced by ``source``'s (e.g. the pretrained ones)."""
    out = dict(state)
    for k in keys:
        if k in source:
            out[k] = source[k]
    return out
