"""Atomic outputs: write under a temporary name, then rename; never clobber silently."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tvq.errors import TvqError, where


def check_output(path: Path, overwrite: bool, inputs: list[Path] = ()) -> None:
    """Refuse to overwrite an existing output (unless asked) and never write over an input."""
    resolved = path.resolve()
    for inp in inputs:
        inp_r = Path(inp).resolve()
        if resolved == inp_r or inp_r.is_relative_to(resolved):
            raise TvqError(f"{where(path)}: output would overwrite the input {inp}")
        if inp_r.is_dir() and resolved.is_relative_to(inp_r):
            raise TvqError(f"{where(path)}: output would be written inside the input folder {inp}")
    if path.exists() and not overwrite:
        raise TvqError(f"{where(path)}: output already exists (pass --overwrite to replace it)")


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _replace(tmp: Path, path: Path) -> None:
    """Move tmp into place; an existing directory is swapped out and removed only afterwards."""
    if path.is_dir() and not path.is_symlink():
        old = _temp_sibling(path)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file path that becomes ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
