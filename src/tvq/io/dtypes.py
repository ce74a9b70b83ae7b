"""The dtypes tvq stores, and their names: one table, read both ways.

``SAFETENSORS_DTYPES`` maps the safetensors header's names to torch dtypes; its inverse
``DTYPE_NAMES`` is what the streaming writer puts in a header, and ``TORCH_DTYPES`` maps
torch's own short names (``"float32"``, what a pack manifest records for a raw tensor) back.
"""

from __future__ import annotations

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch's short name of a dtype: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


TORCH_DTYPES: dict[str, torch.dtype] = {dtype_name(dtype): dtype for dtype in SAFETENSORS_DTYPES.values()}
