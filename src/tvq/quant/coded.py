"""A quantized tensor as a value table and per-element codes: τ̂ = table[index].

Elementwise schemes decode each code to one fp32 value, so a b-bit tensor takes at most
2^b distinct values. Keeping it in this form lets a merge work per distinct value (or
per combination of values across tasks) instead of per element; see tvq.merge.coded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CodedTensor:
    """τ̂ = ``table[index]`` for one task and tensor (``index`` flat uint8/int16/int32)."""

    table: torch.Tensor  # fp32 [V]
    index: torch.Tensor  # flat integer codes, values < V

    @property
    def values(self) -> int:
        return self.table.numel()
