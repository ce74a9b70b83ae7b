"""Which files of a model folder hold weights: a merged or saved folder copies the others
(config, tokenizer, README) from its source and writes its own weights."""

from __future__ import annotations

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".index.json")


def is_weight_file(name: str) -> bool:
    """A weight file or a shard index, of any framework (never copied beside new weights)."""
    return name.endswith(WEIGHT_SUFFIXES)
