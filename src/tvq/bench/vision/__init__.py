"""The vision suite: image tasks from packages, EfficientNet-Lite0 (or any image encoder), the same grid.

``tvq bench build --suite vision`` / ``tvq bench run --suite vision``; in Python::

    from tvq.bench.vision import ImageData, ImageTaskSpec, build, preset, register_image_task
    register_image_task(ImageTaskSpec("mine", lambda cache: ImageData("mine", x_uint8, y, classes)))
    build(preset("full", tasks=["mine", "mnist"], encoder="/path/to/clip", image_size=224, head="text"))

An encoder other than EfficientNet-Lite0 or a Hugging Face CLIP folder plugs in with
``register_encoder(kind, factory)`` (see :mod:`tvq.bench.vision.encoders`). Heavy modules are
imported lazily, as in ``tvq.bench``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "ImageData": "tvq.bench.vision.data",
    "ImageTaskSpec": "tvq.bench.vision.data",
    "ImageSplits": "tvq.bench.vision.data",
    "register_image_task": "tvq.bench.vision.data",
    "list_image_tasks": "tvq.bench.vision.data",
    "load_images": "tvq.bench.vision.data",
    "split_images": "tvq.bench.vision.data",
    "ImageEncoder": "tvq.bench.vision.encoders",
    "register_encoder": "tvq.bench.vision.encoders",
    "make_encoder": "tvq.bench.vision.encoders",
    "VisionConfig": "tvq.bench.vision.config",
    "preset": "tvq.bench.vision.config",
    "build": "tvq.bench.vision.train",
    "finetune_images": "tvq.bench.vision.train",
    "VisionRun": "tvq.bench.vision.run",
    "VisionTask": "tvq.bench.vision.run",
    "EfficientNetLite0": "tvq.bench.vision.efficientnet",
    "load_efficientnet_lite0": "tvq.bench.vision.efficientnet",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tvq.bench.vision' has no attribute {name!r}")
