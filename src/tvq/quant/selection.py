"""Which tensors get quantized, kept at full precision, or left out of task vectors."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the rules are read by the CLI, which must not import torch to show --help
    from tvq.io.readers import TensorMeta


class KeyRule(str, Enum):
    """``ndim``: quantize float tensors of 2+ dims (tvq default, any architecture).
    ``paper``: the official code's rule: 'weight' in the key, no 'ln_', not 'token_embedding.weight'."""

    NDIM = "ndim"
    PAPER = "paper"


class TensorRole(str, Enum):
    QUANTIZE = "quantize"
    KEEP = "keep"  # stored exactly (fp32 delta, or the original tensor for FQ)
    SKIP = "skip"  # non-float buffers (position ids, masks): not part of a task vector


def tensor_role(key: str, meta: TensorMeta, rule: KeyRule = KeyRule.NDIM) -> TensorRole:
    if not meta.is_float:
        return TensorRole.SKIP
    if rule == KeyRule.PAPER:
        paper = "weight" in key and "ln_" not in key and "token_embedding.weight" not in key
        return TensorRole.QUANTIZE if paper and meta.numel > 0 else TensorRole.KEEP
    return TensorRole.QUANTIZE if len(meta.shape) >= 2 and meta.numel > 0 else TensorRole.KEEP
