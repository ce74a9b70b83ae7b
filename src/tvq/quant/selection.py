"""Which tensors get quantized, kept at full precision, or left out of task vectors.

Running statistics of normalization layers (BatchNorm's ``running_mean``/``running_var``, ...)
are statistics of the activations, not weights: they are kept exactly in packs, like biases,
and never merged as task-vector entries (``tvq.merge`` chooses them with ``--norm-stats``).
``is_statistic`` is the one name rule for both; ``tvq.normstats.statistic_keys`` adds the
module structure where a module is at hand.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the rules are read by the CLI, which must not import torch to show --help
    from tvq.io.readers import TensorMeta

# Buffer names of running statistics: PyTorch's _NormBase (BatchNorm*, SyncBatchNorm,
# InstanceNorm* with track_running_stats), Keras (moving_mean/moving_variance), MXNet
# (moving_var), and running_std of whitening layers; plus anything under Flax's "batch_stats".
STATISTIC_NAMES = frozenset(
    {"running_mean", "running_var", "num_batches_tracked", "moving_mean", "moving_variance", "moving_var", "running_std"}
)
STATISTIC_SCOPES = frozenset({"batch_stats"})


def is_statistic(key: str) -> bool:
    """Whether the tensor ``key`` is a running statistic, by its name (any architecture:
    its last component is a statistic's buffer name, or it sits under ``batch_stats``)."""
    parts = key.replace("/", ".").split(".")
    return parts[-1] in STATISTIC_NAMES or any(p in STATISTIC_SCOPES for p in parts[:-1])


class KeyRule(str, Enum):
    """``ndim``: quantize float tensors of 2+ dims (tvq default, any architecture).
    ``paper``: the official code's rule: 'weight' in the key, no 'ln_', not 'token_embedding.weight'."""

    NDIM = "ndim"
    PAPER = "paper"


class TensorRole(str, Enum):
    QUANTIZE = "quantize"
    KEEP = "keep"  # stored exactly (fp32 delta, or the original tensor for FQ)
    STATISTIC = "statistic"  # a float running statistic: stored exactly as KEEP is, never merged
    SKIP = "skip"  # non-float buffers (position ids, masks, BN's num_batches_tracked): not part of a task vector

    @property
    def exact(self) -> bool:
        """Stored exactly in a pack (the raw τ_t, or θ_t for FQ)."""
        return self in (TensorRole.KEEP, TensorRole.STATISTIC)


def tensor_role(key: str, meta: TensorMeta, rule: KeyRule = KeyRule.NDIM) -> TensorRole:
    if not meta.is_float:
        return TensorRole.SKIP
    if is_statistic(key):
        return TensorRole.STATISTIC
    if rule == KeyRule.PAPER:
        paper = "weight" in key and "ln_" not in key and "token_embedding.weight" not in key
        return TensorRole.QUANTIZE if paper and meta.numel > 0 else TensorRole.KEEP
    return TensorRole.QUANTIZE if len(meta.shape) >= 2 and meta.numel > 0 else TensorRole.KEEP
