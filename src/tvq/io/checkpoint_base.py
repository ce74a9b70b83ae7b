"""What every checkpoint reader shares: tensor metadata, the reader protocol and base, and
the checks a stranger's file gets before it is opened (a regular file, bounded names)."""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from tvq.errors import CheckpointError, where

MAX_TENSOR_NAME = 1024
_PSEUDO_ROOTS = (("/", "proc"), ("/", "sys"))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def refuse_pseudo_file(path: Path) -> None:
    """Refuse a path in /proc or /sys, or leading there: kernel files that look regular but
    may block a read or never end."""
    plain = Path(os.path.abspath(path))
    for candidate in (plain, Path(os.path.realpath(path))):
        if candidate.parts[:2] in _PSEUDO_ROOTS:
            via = "" if candidate == plain else f" ({candidate})"
            raise CheckpointError(f"{where(path)}: a kernel pseudo-file{via}, not a checkpoint")


def regular_file(path: Path) -> int:
    """The size of ``path``, refused unless it is a plain file: a FIFO, a device or a kernel
    pseudo-file could block a read forever or never end, so it is never opened."""
    refuse_pseudo_file(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{where(path)}: file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{where(path)}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kinds = (
            (stat.S_ISDIR, "a folder"),
            (stat.S_ISFIFO, "a FIFO"),
            (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"),
        )
        kind = next((name for test, name in kinds if test(st.st_mode)), "not a plain file")
        raise CheckpointError(f"{where(path)}: not a regular file ({kind})")
    return st.st_size


def check_tensor_name(file: Path, key: str) -> None:
    """Tensor names end up in messages and output files: bounded, and on one line."""
    if len(key) > MAX_TENSOR_NAME:
        raise CheckpointError(f"{where(file)}: tensor name of {len(key)} characters (at most {MAX_TENSOR_NAME}): {key[:60]!r}...")
    if _CONTROL.search(key):
        raise CheckpointError(f"{where(file)}: tensor name {key[:80]!r} contains a control character")


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored data."""
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class CheckpointReader(Protocol):
    """What every reader offers: key listing, metadata, and one-tensor reads."""

    path: Path

    def keys(self) -> list[str]: ...

    def meta(self, key: str) -> TensorMeta: ...

    def get(self, key: str) -> torch.Tensor: ...

    def float_bytes(self) -> int:
        """Size of the floating-point tensors as FP32."""
        ...


class ReaderBase:
    path: Path

    def __contains__(self, key: str) -> bool:
        return key in self._metas

    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, key: str) -> TensorMeta:
        try:
            return self._metas[key]
        except KeyError:
            raise CheckpointError(f"{where(self.path, key)}: no such tensor in this checkpoint") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._metas)

    def share(self, alias: str, name: str) -> None:
        """Read ``alias`` as ``name``: a tie this file stores once (``tvq.io.tied.align_ties``)."""
        self._metas[alias] = self._metas[name]

    def hide(self, key: str) -> None:
        """Leave ``key`` out: a tied name the model being compared with does not list."""
        del self._metas[key]

    def float_bytes(self, bytes_per_element: int = 4) -> int:
        """Size of the floating-point tensors at a given precision (FP32 by default)."""
        return sum(m.numel * bytes_per_element for m in self._metas.values() if m.is_float)

    _metas: dict[str, TensorMeta]


def one_line(text: str, limit: int = 200) -> str:
    """A library's message fit for one line of ours: no ANSI codes, no line breaks, bounded."""
    return " ".join(ANSI.sub("", text).split())[:limit]


WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")  # where training scripts nest a model


def wrapped_model(obj: Mapping[Any, Any], file: Path, holds_model: Callable[[Any], bool]) -> Any:
    """The one entry under a ``WRAPPER_KEYS`` name that ``holds_model``, for a checkpoint with
    no tensors at its top level (``{"state_dict": ...}``); one line naming the file otherwise."""
    nested = [k for k in WRAPPER_KEYS if holds_model(obj.get(k))]
    if len(nested) > 1:
        raise CheckpointError(f"{where(file)}: holds state dicts under both {nested[0]!r} and {nested[1]!r}; save the one you mean on its own")
    if not nested:
        keys = ", ".join(repr(str(k)[:40]) for k in list(obj)[:5]) + (", ..." if len(obj) > 5 else "")
        raise CheckpointError(
            f"{where(file)}: holds no tensors, at its top level or under {', '.join(map(repr, WRAPPER_KEYS))} (its keys: {keys or 'none'})"
        )
    return obj[nested[0]]
