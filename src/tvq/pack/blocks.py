"""One stored tensor of a pack, decoded a block of elements at a time (a merge's working set).

Packed codes are a little-endian bit stream, so elements ``[s, e)`` with ``s`` a multiple of
:data:`ALIGN` are bytes ``[s·b/8, ⌈e·b/8⌉)`` at any width b; entropy-coded codes are independent
zstd frames over the byte-aligned layout (tvq.quant.entropy), so a block decodes the frames
covering its aligned bytes (the last one is kept for the next block). Blocks are read in
order, each stored byte once, and hashed as they are read: the tensor's sha256 is checked when
the last block is read, before that block is handed out, so a merge never completes from
tampered bytes (its output is atomic: nothing is published after an error). Raw entries are
read by element range (entropy-coded ones, version 4, by the frames covering it, each
un-shuffled as it is decoded); constants read nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
import zstandard

from tvq.errors import PackError
from tvq.io.dtypes import TORCH_DTYPES
from tvq.io.readers import SafetensorsFile
from tvq.pack.manifest import ConstEntry, QuantizedEntry, RawEntry, TensorEntry
from tvq.quant.coded import CodedTensor
from tvq.quant.entropy import StreamError, aligned_bits, aligned_nbytes, block_lengths, codes_from_aligned, unbitshuffle
from tvq.quant.packing import unpack_codes
from tvq.quant.schemes import get_scheme

ALIGN = 8  # block starts are multiples of this many elements: whole bytes at every code width


def blockable(entry: TensorEntry) -> bool:
    """Whether ``entry`` decodes by blocks here: codes of an elementwise scheme (no per-group
    arrays), a raw tensor, or a constant."""
    return not isinstance(entry, QuantizedEntry) or not entry.aux


class _HashedBytes:
    """One stored array read front to back in consecutive ranges, hashed as it goes."""

    def __init__(self, handle: SafetensorsFile, name: str, dtype: torch.dtype, numel: int, sha256: str, label: str) -> None:
        meta = handle.metas.get(name)
        if meta is None:
            raise PackError(f"{label}: missing from the pack file")
        if meta.dtype != dtype or meta.numel != numel:
            raise PackError(f"{label}: stored as {meta.dtype} of {meta.numel} elements, the manifest says {dtype} of {numel}")
        self._handle, self._name, self._sha, self._label = handle, name, sha256, label
        self._hash = hashlib.sha256()
        self._at = 0
        self.nbytes = numel * dtype.itemsize

    def read(self, start: int, end: int) -> torch.Tensor:
        """Bytes ``[start, end)``; ``start`` is where the previous read ended."""
        if start != self._at:
            raise ValueError(f"blocks must be read in order: bytes from {start}, expected {self._at}")
        data = self._handle.read_bytes(self._name, start, end - start)
        self._hash.update(memoryview(data.numpy()))  # type: ignore[arg-type]  # ndarray is a buffer
        self._at = end
        if end == self.nbytes and self._hash.hexdigest() != self._sha:
            raise PackError(f"{self._label}: checksum mismatch (pack file corrupted or tampered)")
        return data


class _Frames:
    """An entropy-coded stream (independent zstd frames of ``block`` decoded bytes each) read a
    byte range of the decoded stream at a time, in order; the last frame decoded is kept for the
    next range. ``itemsize`` set: each frame is a bit-shuffled block of a raw tensor, un-shuffled
    as it is decoded."""

    def __init__(self, stored: _HashedBytes, blocks: list[int], block: int, total: int, label: str, itemsize: int | None = None) -> None:
        self._bytes, self._block, self._label, self._itemsize = stored, block, label, itemsize
        lengths = block_lengths(total, block)
        if len(blocks) != len(lengths) or sum(blocks) != stored.nbytes:
            raise PackError(f"{label}: malformed entropy-coded stream: block sizes do not add up to the stream")
        offsets = np.cumsum([0, *blocks[:-1]]).tolist()
        self._frames = list(zip(offsets, blocks, lengths, strict=True))  # (coded offset, coded size, decoded length)
        self._dctx = zstandard.ZstdDecompressor(max_window_size=max(block, 1 << 10))
        self._cached: tuple[int, np.ndarray] | None = None  # (frame index, its decoded bytes)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Decoded bytes ``[lo, hi)``."""
        if hi <= lo:
            return np.zeros(0, dtype=np.uint8)
        size = self._block
        parts = [self._frame(i)[max(lo - i * size, 0) : hi - i * size] for i in range(lo // size, (hi - 1) // size + 1)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)  # numpy: torch.cat of uint8 is slow here

    def _frame(self, i: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        offset, size, length = self._frames[i]
        frame = memoryview(self._bytes.read(offset, offset + size).numpy())  # type: ignore[arg-type]  # ndarray is a buffer
        try:
            declared = zstandard.frame_content_size(frame)
            obj = self._dctx.decompressobj(write_size=max(length, 1))
            raw = obj.decompress(frame)
        except zstandard.ZstdError as exc:
            raise PackError(f"{self._label}: malformed entropy-coded stream: block {i}: corrupt frame ({str(exc)[:120]})") from None
        if declared != length or not obj.eof or obj.unused_data or len(raw) != length:
            raise PackError(f"{self._label}: malformed entropy-coded stream: block {i} does not decode to {length} bytes")
        out = np.frombuffer(bytearray(raw), dtype=np.uint8)  # writable: torch takes it without a copy
        if self._itemsize is not None:
            out = unbitshuffle(out, self._itemsize)
        self._cached = (i, out)
        return out


class _Codes:
    """The codes of one ``q`` entry, a block of elements at a time (flat uint8)."""

    def __init__(self, handle: SafetensorsFile, name: str, entry: QuantizedEntry, label: str) -> None:
        self._entry, self._label = entry, label
        self._bytes = _HashedBytes(handle, name, torch.uint8, entry.nbytes, entry.sha256, label)
        coding = entry.entropy
        self._frames = None
        if coding is not None:
            self._frames = _Frames(self._bytes, coding.blocks, coding.block, aligned_nbytes(entry.numel, entry.bits), label)

    def block(self, start: int, end: int) -> torch.Tensor:
        entry = self._entry
        if self._frames is None:
            lo, hi = start * entry.bits // 8, (end * entry.bits + 7) // 8
            return unpack_codes(self._bytes.read(lo, hi), entry.bits, end - start)
        width = aligned_bits(entry.bits)
        aligned = self._frames.read(start * width // 8, (end * width + 7) // 8)
        try:
            return codes_from_aligned(torch.from_numpy(aligned), entry.bits, end - start)
        except StreamError as exc:
            raise PackError(f"{self._label}: malformed entropy-coded stream: {exc}") from None


class StoredBlocks:
    """One stored entry (``q`` of an elementwise scheme, ``raw``, ``const``) by element blocks:
    ``coded`` gives a ``q``/``const`` block as a value table and codes (the table as
    ``Pack.coded`` builds it), ``raw`` a raw block in its stored dtype."""

    def __init__(self, handle: SafetensorsFile | None, name: str, entry: TensorEntry, label: str) -> None:
        self.entry = entry
        self._label = label
        self._codes: _Codes | None = None
        self._raw: _HashedBytes | None = None
        self._raw_frames: _Frames | None = None  # an entropy-coded raw entry's frames
        if isinstance(entry, QuantizedEntry) and handle is not None:
            scheme = get_scheme(entry.scheme)
            every_code = torch.arange(2**entry.bits, dtype=torch.int32).to(torch.uint8)
            self.table = scheme.decode(every_code, entry.bits, entry.params, {}).reshape(-1).float()
            self._codes = _Codes(handle, name, entry, label)
        elif isinstance(entry, RawEntry) and handle is not None:
            self._dtype = TORCH_DTYPES[entry.dtype]
            coding = entry.entropy
            if coding is None:
                self._raw = _HashedBytes(handle, name, self._dtype, entry.numel, entry.sha256, label)
            else:
                self._raw = _HashedBytes(handle, name, torch.uint8, entry.nbytes, entry.sha256, label)
                total = entry.numel * self._dtype.itemsize
                self._raw_frames = _Frames(self._raw, coding.blocks, coding.block, total, label, self._dtype.itemsize)
        elif isinstance(entry, ConstEntry):
            self.table = torch.tensor([entry.value], dtype=torch.float32)

    @property
    def is_raw(self) -> bool:
        return self._raw is not None

    def coded(self, start: int, end: int) -> CodedTensor:
        if self._codes is not None:
            return CodedTensor(self.table, self._codes.block(start, end))
        return CodedTensor(self.table, torch.zeros(end - start, dtype=torch.uint8))

    def raw(self, start: int, end: int) -> torch.Tensor:
        """A raw entry's elements, stored dtype, checked finite (floats)."""
        assert self._raw is not None
        size = self._dtype.itemsize
        if self._raw_frames is not None:
            data = torch.from_numpy(self._raw_frames.read(start * size, end * size).copy()).view(self._dtype)
        else:
            data = self._raw.read(start * size, end * size).view(self._dtype)
        if data.is_floating_point() and not bool(torch.isfinite(data).all()):
            raise PackError(f"{self._label}: stored tensor contains NaN or Inf")
        return data


Elements = Callable[[int, int], torch.Tensor]  # (start, end) -> elements of a flattened tensor


class TaskBlocks:
    """τ̂ of one tensor of one task by blocks, as ``Pack.task_tensor`` forms it: a value table
    and codes (TVQ; RTVQ's base and offset combined as ``Pack.coded`` does), or fp32 values
    (raw entries; FQ's θ̂_t − θ_pre, with the pretrained block from ``pretrained``)."""

    def __init__(self, stored: StoredBlocks, base: StoredBlocks | None, pretrained: Elements | None, label: str) -> None:
        self._stored, self._base, self._pretrained, self._label = stored, base, pretrained, label
        if base is not None:
            self._table = (base.table[:, None] + stored.table[None, :]).reshape(-1)
            self._finite(self._table)
            self._wide = torch.uint8 if self._table.numel() <= 256 else torch.int32

    def read(self, start: int, end: int) -> CodedTensor | torch.Tensor:
        """Elements ``[start, end)``, read in order block after block."""
        stored = self._stored
        if self._pretrained is not None:  # FQ: τ̂ = θ̂_t − θ_pre
            value = stored.raw(start, end) if stored.is_raw else values(stored.coded(start, end))
            return self._finite(value.float() - self._pretrained(start, end).float())
        if stored.is_raw:
            return stored.raw(start, end).float()
        if self._base is None:
            return stored.coded(start, end)
        base, own = self._base.coded(start, end), stored.coded(start, end)
        index = base.index.to(self._wide).mul_(own.values).add_(own.index.to(self._wide))
        return CodedTensor(self._table, index)

    def _finite(self, tau: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(tau).all()):
            raise PackError(f"{self._label}: the task vector overflows float32 (NaN or Inf)")
        return tau


def values(coded: CodedTensor) -> torch.Tensor:
    """``table[index]``, fp32 (what the codes decode to)."""
    return torch.index_select(coded.table, 0, coded.index.to(torch.int32))
