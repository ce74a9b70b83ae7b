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

# What an output may be cast to (``--dtype``), with the spellings users type.
OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``same``/None keeps each tensor's own dtype (None); otherwise float32/float16/bfloat16.
    An unknown name raises ValueError with the choices (callers add the option's name)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "same":
        return None
    try:
        return OUTPUT_DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"{dtype!r} is unknown: choose same, float32, float16 or bfloat16") from None
