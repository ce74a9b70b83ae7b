"""The real benchmark: 8 text tasks from packages, MiniLM fine-tunes, frozen heads, evaluation.

Heavy modules (torch models, transformers) are imported lazily so that ``tvq --help`` stays fast;
``from tvq.bench import build, evaluate, open_run`` works as usual.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from tvq.errors import TvqError


class BenchError(TvqError):
    """A benchmark run cannot proceed (bad option, stale output, unusable data)."""


class BenchDataError(BenchError):
    """A task's data cannot be obtained: the message names the package and how to get it."""


_LAZY = {
    "TaskData": "tvq.bench.data",
    "TaskSpec": "tvq.bench.data",
    "Splits": "tvq.bench.data",
    "register_task": "tvq.bench.data",
    "jsonl_task": "tvq.bench.data",
    "get_task": "tvq.bench.data",
    "list_tasks": "tvq.bench.data",
    "load_task": "tvq.bench.data",
    "split_task": "tvq.bench.data",
    "default_cache_dir": "tvq.bench.data",
    "BenchConfig": "tvq.bench.config",
    "PRESETS": "tvq.bench.config",
    "preset": "tvq.bench.config",
    "build": "tvq.bench.train",
    "finetune": "tvq.bench.train",
    "BenchRun": "tvq.bench.evaluate",
    "BenchTask": "tvq.bench.evaluate",
    "open_run": "tvq.bench.evaluate",
    "evaluate": "tvq.bench.evaluate",
    "evaluate_all": "tvq.bench.evaluate",
    "predict_logits": "tvq.bench.evaluate",
    "task_logits": "tvq.bench.evaluate",
    "adamerging_inputs": "tvq.bench.evaluate",
}

__all__ = ["BenchDataError", "BenchError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tvq.bench' has no attribute {name!r}")
