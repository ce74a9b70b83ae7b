"""tvq: task-vector quantization (FQ / TVQ / RTVQ) with bit-packed storage, and merging."""

__version__ = "0.1.0"

import os

# Large CPU tensors on transparent huge pages (torch reads this once, at its first
# allocation, so it must be set before torch is imported). Reading a 1.1B-parameter
# checkpoint into fresh buffers is then 3.8x faster: 512x fewer page faults. Opt out with
# THP_MEM_ALLOC_ENABLE=0.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from tvq.compress import QuantizeOptions, average_checkpoints, quantize  # noqa: E402
from tvq.errors import TvqError  # noqa: E402
from tvq.io.readers import open_checkpoint  # noqa: E402
from tvq.pack.reader import Pack, open_pack  # noqa: E402
from tvq.vector import TaskVector  # noqa: E402

__all__ = [
    "Pack",
    "QuantizeOptions",
    "TaskVector",
    "TvqError",
    "average_checkpoints",
    "open_checkpoint",
    "open_pack",
    "quantize",
]
