"""Model merging straight from task vectors: FP32 checkpoints, TVQ/RTVQ/FQ packs, or a mix.

    from tvq.merge import load_task_vectors, merge
    pre, tvs = load_task_vectors("base/", packs=["pack/"], finetuned={"extra": "ft.safetensors"})
    merge("ties", pre, tvs, "merged/", {"density": 0.2, "lambda": 0.3})
    merge("ties", pre, tvs, "merged/", executor=tvq.execute.make_executor("ray"))  # same bytes

Methods stream tensor by tensor; see ``available_methods()`` and docs/merging.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    "AdaMergingResult": "tvq.merge.adamerging",
    "adamerging": "tvq.merge.adamerging",
    "entropy_loss": "tvq.merge.adamerging",
    "MergeJob": "tvq.merge.engine",
    "MergeReport": "tvq.merge.engine",
    "emr_task_model": "tvq.merge.engine",
    "merge": "tvq.merge.engine",
    "merge_key": "tvq.merge.engine",
    "merge_state_dict": "tvq.merge.engine",
    "write_model": "tvq.merge.engine",
    "EMRPack": "tvq.merge.methods.emr",
    "open_emr": "tvq.merge.methods.emr",
    "MergeMethod": "tvq.merge.registry",
    "MethodOptions": "tvq.merge.registry",
    "available_methods": "tvq.merge.registry",
    "build_method": "tvq.merge.registry",
    "merge_method": "tvq.merge.registry",
    "method_class": "tvq.merge.registry",
    "MergeInputs": "tvq.merge.source",
    "Origin": "tvq.merge.source",
    "TaskInput": "tvq.merge.source",
    "TaskInputs": "tvq.merge.source",
    "TaskSource": "tvq.merge.source",
    "load_task_vectors": "tvq.merge.source",
}


def __getattr__(name: str) -> Any:
    """The API loads on first use: ``tvq merge --help`` (whose command lives in this package)
    must not import torch."""
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tvq.merge' has no attribute {name!r}")


__all__ = [
    "AdaMergingResult",
    "EMRPack",
    "MergeInputs",
    "MergeJob",
    "MergeMethod",
    "MergeReport",
    "MethodOptions",
    "Origin",
    "TaskInput",
    "TaskInputs",
    "TaskSource",
    "adamerging",
    "available_methods",
    "build_method",
    "emr_task_model",
    "entropy_loss",
    "load_task_vectors",
    "merge",
    "merge_key",
    "merge_method",
    "merge_state_dict",
    "method_class",
    "open_emr",
    "write_model",
]
