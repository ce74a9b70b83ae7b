"""tvq.heap: freed heap memory goes back to the system between tensors (glibc)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tvq import heap

glibc = pytest.mark.skipif(heap._libc() is None, reason="glibc's malloc_trim/mallinfo2 only")


def _anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@glibc
def test_release_returns_pages_a_fragmented_heap_keeps() -> None:
    # blocks under glibc's mmap threshold, each followed by a small array that outlives it:
    # the freed blocks stay resident in the heap until trimmed
    big, small = [], []
    for _ in range(400):
        big.append(torch.ones(100_000, dtype=torch.uint8))
        small.append(torch.ones(8, dtype=torch.uint8))
    del big
    assert heap.free_heap_bytes() > 30_000_000
    before = _anon_bytes()
    assert heap.release(slack=1 << 20)
    assert before - _anon_bytes() > 20_000_000
    assert len(small) == 400


@glibc
def test_release_is_a_no_op_under_the_slack() -> None:
    assert not heap.release(slack=1 << 62)


def test_free_heap_bytes_is_a_count() -> None:
    assert heap.free_heap_bytes() >= 0
