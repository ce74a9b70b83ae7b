"""File versions: a cache keyed by a path and its stamp never serves a rewritten file stale."""

from __future__ import annotations

from pathlib import Path


def input_stamp(path: Path) -> tuple[int, int]:
    """Modification time and size (of a folder's shard index, when it has one): a rewritten
    input is opened afresh, never served stale."""
    target = path / "model.safetensors.index.json" if path.is_dir() else path
    st = (target if target.exists() else path).stat()
    return st.st_mtime_ns, st.st_size
