"""Confining file names that come from strangers' files to the folder they belong to.

A pack manifest names its files, a shard index names its shards: both come from whoever
made the pack or the model folder. Each such name is checked here, once, before anything
opens it: a plain relative path of ordinary components that stays inside its folder after
symlinks are resolved. See docs/security.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from tvq.errors import TvqError, where

MAX_NAME_LENGTH = 255  # one component, as most file systems allow
MAX_PATH_LENGTH = 1024
MAX_DEPTH = 8
# What a component may hold: no separators, no control characters, no NUL.
_COMPONENT = re.compile(r"^[^/\\\x00-\x1f\x7f]+$")
# The names tvq itself writes in a pack: ``base.safetensors``, ``tasks/000-name.safetensors``.
PACK_FILE_NAME = re.compile(r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}/)?[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}\.safetensors$")


def name_problem(name: object, pattern: re.Pattern[str] | None = None) -> str | None:
    """Why ``name`` is not a safe relative file name (None when it is one)."""
    if not isinstance(name, str):
        return f"file name must be a string, got {type(name).__name__}"
    if not name:
        return "empty file name"
    if len(name) > MAX_PATH_LENGTH:
        return f"file name of {len(name)} characters (at most {MAX_PATH_LENGTH})"
    shown = repr(name[:80])
    if "\\" in name:
        return f"file name {shown} contains a backslash"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return f"file name {shown} is an absolute path"
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        return f"file name {shown} is nested more than {MAX_DEPTH} folders deep"
    for part in parts:
        if part in ("", ".", ".."):
            return f"file name {shown} has a '{part or '//'}' component"
        if not _COMPONENT.match(part):
            return f"file name {shown} contains a control character"
        if len(part) > MAX_NAME_LENGTH:
            return f"file name {shown} has a component longer than {MAX_NAME_LENGTH} characters"
    if pattern is not None and not pattern.match(name):
        return f"file name {shown} is not one tvq writes"
    return None


def confined(root: Path, name: object, source: Path, pattern: re.Pattern[str] | None = None, error: type[TvqError] = TvqError) -> Path:
    """``root / name`` for a ``name`` read from ``source``, refused unless it is a plain
    relative name that still lies inside ``root`` once symlinks are resolved."""
    problem = name_problem(name, pattern)
    if problem is None:
        path = root / str(name)
        if not path.resolve().is_relative_to(root.resolve()):
            problem = f"file name {str(name)[:80]!r} leads outside {root} (through a symlink)"
        else:
            return path
    raise error(f"{where(source)}: {problem}")
