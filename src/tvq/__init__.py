"""tvq: task-vector quantization (FQ / TVQ / RTVQ) with bit-packed storage, and merging.

The public API is loaded on first use (``tvq.quantize``, ``tvq.open_pack``, ...), so that
importing tvq, or running ``tvq --help``, does not import torch. Importing tvq changes
nothing in the host process (no environment variables, no signal handlers).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from tvq.version import __version__

if TYPE_CHECKING:
    from tvq.encode.options import QuantizeOptions
    from tvq.encode.pipeline import average_checkpoints, quantize
    from tvq.errors import TvqError
    from tvq.io.readers import open_checkpoint
    from tvq.pack.reader import Pack, open_pack
    from tvq.vector import TaskVector

_PUBLIC = {
    "QuantizeOptions": "tvq.encode.options",
    "average_checkpoints": "tvq.encode.pipeline",
    "quantize": "tvq.encode.pipeline",
    "TvqError": "tvq.errors",
    "open_checkpoint": "tvq.io.readers",
    "Pack": "tvq.pack.reader",
    "open_pack": "tvq.pack.reader",
    "TaskVector": "tvq.vector",
}

__all__ = [
    "Pack",
    "QuantizeOptions",
    "TaskVector",
    "TvqError",
    "__version__",
    "average_checkpoints",
    "open_checkpoint",
    "open_pack",
    "quantize",
]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # once: later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'tvq' has no attribute {name!r}")
