"""Where the arithmetic runs: ``--device cpu`` (the default), ``cuda`` or ``cuda:N``.

Inputs are always read, hashed and written on the host; on a GPU, each tensor's inputs (as
stored: bf16 moves half the bytes of fp32) or each block's codes move to the device, the
elementwise fp32 math runs there, and the packed codes or merged block come back. Every
elementwise operation (subtract, min/max, scale, round, clamp, divide, table lookup, the
in-order task sums) is IEEE-exact on both, so codes, scales and merged bytes are the same
as on the CPU; what differs is the order of reductions over many elements (the error
statistics of a pack's manifest, |τ̂ − τ|² and |τ|², may differ in the last digits).
"""

from __future__ import annotations

import torch

from tvq.errors import ConfigError

CPU = torch.device("cpu")
DEVICE_CHUNK = 1 << 24  # elements per chunk on a GPU: 64 MiB fp32 buffers, few kernel launches per tensor


def parse_device(name: str | torch.device | None) -> torch.device:
    """``name`` as a usable device, or a ConfigError saying why not (one line)."""
    if name is None:
        return CPU
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return CPU
    if device.type != "cuda":
        raise ConfigError(f"--device {name}: tvq computes on cpu or cuda, not {device.type}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {name}: only {count} CUDA device(s) here (cuda:0 .. cuda:{count - 1})")
    return device


def on_host(device: torch.device | None) -> bool:
    return device is None or device.type == "cpu"


def divisor_for(t: torch.Tensor, divisor: float | torch.Tensor) -> float | torch.Tensor:
    """``divisor`` as an operand of ``t / divisor`` rounded once, as on the host: CUDA divides
    by a host scalar as a product with its reciprocal (one bit off for some values), so there
    the divisor goes along as a 0-dim tensor and the quotient is a true division on both."""
    return divisor if t.device.type == "cpu" else torch.as_tensor(divisor, dtype=t.dtype).to(t.device)


def divide_(t: torch.Tensor, divisor: float | torch.Tensor) -> torch.Tensor:
    """``t /= divisor``, the same bits on every device (``divisor_for``)."""
    return t.div_(divisor_for(t, divisor))
