"""Benchmark tasks: built-in package-backed tasks, user tasks, caching and seeded splits."""

from tvq.bench.data import sources  # noqa: F401  (registers the 8 built-in tasks)
from tvq.bench.data.registry import (
    Example,
    Splits,
    TaskData,
    TaskSpec,
    default_cache_dir,
    get_task,
    jsonl_task,
    list_tasks,
    load_task,
    register_task,
    split_task,
)

__all__ = [
    "Example",
    "Splits",
    "TaskData",
    "TaskSpec",
    "default_cache_dir",
    "get_task",
    "jsonl_task",
    "list_tasks",
    "load_task",
    "register_task",
    "split_task",
]
