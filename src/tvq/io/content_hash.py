"""Content hashes of input checkpoints: which algorithm, and how a digest names it.

Hashing the inputs (every byte of the pretrained and fine-tuned weights) is a real part of
``tvq quantize``'s time: sha256 runs at ~1.7 GB/s per core even with SHA-NI, BLAKE3 at
~3.8 GB/s (measured on the benchmark machine). New packs therefore record BLAKE3 digests,
written ``blake3:<hex>``; a bare hex digest is the sha256 of packs made before, and is
still checked with sha256, so old packs keep accepting their own inputs.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import blake3

DEFAULT_ALGORITHM = "blake3"
ALGORITHMS = ("blake3", "sha256")


class Hasher(Protocol):
    def update(self, data, /) -> object: ...
    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str) -> Hasher:
    """A fresh incremental hasher (BLAKE3 single-threaded: tvq parallelises across tensors)."""
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown content-hash algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")


def labelled(algorithm: str, hexdigest: str) -> str:
    """How a digest is stored: ``blake3:<hex>``, or bare hex for sha256 (the original form)."""
    return hexdigest if algorithm == "sha256" else f"{algorithm}:{hexdigest}"


def algorithm_of(digest: str) -> str:
    """The algorithm a stored digest was made with."""
    prefix, sep, _ = digest.partition(":")
    return prefix if sep else "sha256"
