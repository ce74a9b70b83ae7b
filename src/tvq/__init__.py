"""tvq: task-vector quantization (FQ / TVQ / RTVQ) with bit-packed storage, and merging."""

__version__ = "0.1.0"

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
