"""The benchmark suites the CLI can build and run: ``text`` (the default) and ``vision``.

A suite is a preset function, a build function, the data a ``tvq bench data`` table shows and
the default run folder name; everything after the build (run folders, the grid, tables, plots)
is shared. Imports are lazy so ``tvq --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from tvq.bench import BenchError


@dataclass(frozen=True)
class Suite:
    name: str
    config_module: str  # has preset(name, **overrides)
    train_module: str  # has build(config, out, ...)
    run_prefix: str  # default run folder: <cache>/runs/<prefix><preset>

    def preset(self, name: str, **overrides: Any) -> Any:
        return import_module(self.config_module).preset(name, **overrides)

    @property
    def build(self) -> Callable[..., dict[str, Any]]:
        return import_module(self.train_module).build

    def default_run(self, cache: str | Path | None, preset: str) -> Path:
        from tvq.bench.data import default_cache_dir

        return (Path(cache) if cache else default_cache_dir()) / "runs" / f"{self.run_prefix}{preset}"

    def data_rows(self, config: Any, cache: str | Path | None) -> Iterator[tuple[str, str, list[str], int, dict[str, int]]]:
        """(task, source, classes, examples, split sizes) per task of ``config``, converting data as needed."""
        if self.name == "vision":
            from tvq.bench.vision.data import load_images, split_images

            for name in config.tasks:
                d = load_images(name, cache)
                sizes = split_images(d, seed=config.seed, train=config.train_size, val=config.val_size, test=config.test_size).sizes()
                yield d.name, d.source, d.classes, len(d), sizes
            return
        from tvq.bench.data import get_task, load_task, split_task

        for name in config.tasks:
            t = load_task(get_task(name), cache)
            sizes = split_task(t, seed=config.seed, train=config.train_size, val=config.val_size, test=config.test_size).sizes()
            yield t.name, t.source, t.classes, len(t), sizes


SUITES = {
    "text": Suite("text", "tvq.bench.config", "tvq.bench.train", ""),
    "vision": Suite("vision", "tvq.bench.vision.config", "tvq.bench.vision.train", "vision-"),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise BenchError(f"unknown suite '{name}' (known: {', '.join(SUITES)})")
    return SUITES[name]
