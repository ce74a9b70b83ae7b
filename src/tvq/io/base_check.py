"""Is this the pretrained model a pack was made from? Its content hash, as the encoder makes it.

A pack records ``pretrained.digest``: a hash over one line per floating tensor,
``key|dtype|shape|hash(raw bytes)\\n``, keys sorted (docs/pack-format.md). Keys and shapes
alone (``tvq.merge.source``) do not catch another revision of the same architecture, or a
fine-tuned model passed as ``-p`` by mistake: merging on it writes a plausible, wrong model.
Commands that read a pack with a user's ``-p`` recompute the digest here before writing
anything. The encoder computes its lines with :func:`digest_line` too, so both agree by
construction; old packs name sha256 (a bare hex digest) and are checked with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tvq.errors import CheckpointError, where
from tvq.io.content_hash import DEFAULT_ALGORITHM, algorithm_of, labelled, new_hasher
from tvq.io.readers import CheckpointReader, float_keys
from tvq.io.safetensors_writer import tensor_bytes

HASH_THREADS = 4  # hashers release the GIL on large buffers: a few tensors at once, bounded memory
SHORT = 12  # hex digits of a digest shown in messages


def digest_line(key: str, t: torch.Tensor, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """One line of an input's content hash: name, dtype, shape and the hash of the bytes."""
    h = new_hasher(algorithm)
    h.update(tensor_bytes(t))
    return f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|{h.hexdigest()}\n"


def _lines(reader: CheckpointReader, keys: list[str], algorithm: str, threads: int) -> Iterator[str]:
    """Every key's digest line, in ``keys`` order; tensors are read and hashed ``threads`` at a time."""
    if threads <= 1:
        return (digest_line(k, reader.get(k), algorithm) for k in keys)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tvq-hash")
    with pool:
        return iter(list(pool.map(lambda k: digest_line(k, reader.get(k), algorithm), keys)))


def checkpoint_digest(
    reader: CheckpointReader, algorithm: str = DEFAULT_ALGORITHM, keys: Iterable[str] | None = None, threads: int = HASH_THREADS
) -> str:
    """The content hash a pack records for this checkpoint: over its floating tensors (or
    ``keys``), sorted, in the stored form (``blake3:<hex>``; bare hex for sha256)."""
    chosen = sorted(float_keys(reader) if keys is None else keys)
    h = new_hasher(algorithm)
    for line in _lines(reader, chosen, algorithm, threads):
        h.update(line.encode())
    return labelled(algorithm, h.hexdigest())


def short(digest: str) -> str:
    """A digest as messages show it: ``blake3:82b3c5468a7a…``."""
    prefix, sep, hexdigest = digest.rpartition(":")
    return f"{prefix}{sep}{hexdigest[:SHORT]}…" if len(hexdigest) > SHORT else digest


class BaseChecker:
    """Checks one pretrained model against the digests packs recorded, hashing it at most once
    per algorithm (several packs of one base cost one pass)."""

    def __init__(self, reader: CheckpointReader, threads: int = HASH_THREADS) -> None:
        self.reader = reader
        self.threads = threads
        self._digests: dict[str, str] = {}

    def digest(self, algorithm: str) -> str:
        if algorithm not in self._digests:
            self._digests[algorithm] = checkpoint_digest(self.reader, algorithm, threads=self.threads)
        return self._digests[algorithm]

    def check(self, expected: str, pack: str | Path) -> None:
        """Refuse the model unless its content hash is ``expected`` (the pack's ``pretrained.digest``)."""
        got = self.digest(algorithm_of(expected))
        if got != expected:
            raise CheckpointError(
                f"{where(self.reader.path)}: not the pretrained model the pack {pack} was made from: "
                f"its content hash {short(got)} differs from the pack's {short(expected)}"
            )
