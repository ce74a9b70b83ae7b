"""Handing memory the process has freed back to the system between tensors (glibc only).

glibc keeps memory freed inside its heaps resident until a later allocation reuses it. A
merge frees and allocates blocks of many sizes, on several threads (each with its own heap),
and a freed block split by a small allocation that outlives it is never reused whole: the
process then holds far more than it uses (a 16-task TIES merge of a 0.3B Llama from a TVQ4
pack: 984 MiB of anonymous memory, 467 MiB when glibc returns each freed block at once). A
memory cap counts those pages, and no swap frees them. ``release()`` runs between tensors:
when more than ``SLACK`` bytes lie free in the heaps it asks glibc to return their whole
pages (``malloc_trim``; a few milliseconds). Elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

SLACK = 64 << 20  # free heap bytes tolerated before a trim


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """glibc with ``malloc_trim`` and ``mallinfo2`` (2.33+), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = [], _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc


def free_heap_bytes() -> int:
    """Bytes free inside the process's heaps, every thread's included (0 where unknown)."""
    libc = _libc()
    return int(libc.mallinfo2().fordblks) if libc is not None else 0


def release(slack: int = SLACK) -> bool:
    """Return the heaps' free pages to the system when more than ``slack`` bytes lie free;
    whether a trim ran."""
    libc = _libc()
    if libc is None or int(libc.mallinfo2().fordblks) <= slack:
        return False
    libc.malloc_trim(0)
    return True
