"""Lossless entropy coding of a quantized tensor's codes and of exactly stored tensors: a layout,
bytes in and bytes out.

The codes are first laid out *byte-aligned*: bit-packed at the smallest width of 1, 2, 4 or 8
bits that holds them (3-bit codes in 4-bit fields, 5- to 7-bit codes one per byte), so every
byte holds whole codes and a byte-oriented coder sees their joint statistics; for 1, 2, 4 and
8 bits this is the pack's own packing (tvq.quant.packing), and the decoded bytes are the packed
codes every reader already consumes. That stream is cut into blocks of ``block`` bytes, each
compressed as one independent Zstandard frame (RFC 8878: a frozen format, decoded the same by
every zstd version), so a block decodes alone, with memory bounded by the block, and blocks can
be decoded in parallel or streamed. The frames are made with a fast parameter set that
Huffman-codes the literals and takes only long matches (level 1, ``min_match`` 7): on the
codes of real task vectors it is within 1-5 % of the order-0 entropy and decodes at ~1 GB/s
(docs/pack-format.md, benchmarks/entropy_coding.py). zstd's optimal parser codes them 1-6 %
smaller but 10-30x slower, too slow for the default's quantize time targets; it is opt-in
(``strong``, `tvq quantize --entropy max`): the same frames to a reader, as fast to decode. No
file I/O, no arithmetic on weights.

Exactly stored (``raw``) tensors are coded the same way (format version 4): their bytes are cut
into blocks of ``block`` bytes, each block *bit-shuffled* (:func:`bitshuffle`: bit planes of the
elements, so the exponent bits and the zero low mantissa bits of a task vector's small deltas
become long runs) and compressed as one independent zstd frame; decoding gives back the very
bytes of the tensor.

A stream from a stranger is checked before anything is allocated for it: each frame must
declare exactly its block's length, fit its recorded size to the byte, and use a window no
larger than the block; anything else is a :class:`StreamError` with a one-line reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import torch
import zstandard

from tvq.quant.packing import pack_codes, packed_nbytes, unpack_codes

CODER: Final = "zstd"
BLOCK: Final = 1 << 20  # aligned bytes per independently coded block (1 MiB: 4 Mi codes at 2 bits)
MIN_BLOCK: Final = 1 << 12
MAX_BLOCK: Final = 1 << 26
RECORD_BYTES: Final = 128  # about what a coded tensor's record adds to the manifest (JSON, one block)
BLOCK_RECORD_BYTES: Final = 12  # and each further block's coded size
_LEVEL, _MIN_MATCH = 1, 7  # Huffman-coded literals, long matches only: near the entropy of iid codes, fast
# `--entropy max`: the optimal parser finds the short repeats the fast one skips (text benchmark's
# codes: 4.2 % smaller at INT2, 5.6 % RTVQ B3O2, 0.7 % INT3; strategies btopt..btultra2 within 0.2 %)
_STRONG_LEVEL = 19
BITSHUFFLE: Final = "bitshuffle"  # the filter of coded raw tensors (the only one)
# Raw tensors are small (biases, norms: well under a block) or, under the paper's key rule,
# large (embeddings): a slow, strong level for the former costs nothing, the fast one keeps
# the latter's writes near disk speed (measured on the text benchmark's fp32 deltas: level 19
# 0.729 of the bytes, level 3 0.746; zstd decodes every level at about the same speed).
_RAW_LEVEL_SMALL, _RAW_LEVEL, _RAW_SMALL = 19, 3, 1 << 20


@dataclass(frozen=True)
class Coded:
    """The record of a coded stream: the decoded length of a block and each block's coded size."""

    block: int
    blocks: list[int]
    filter: Literal["bitshuffle"] | None = None  # None: byte-aligned codes; "bitshuffle": a raw tensor's bytes


class StreamError(ValueError):
    """A coded stream that does not decode to what its record says (a one-line reason)."""


def pays(coded: int, blocks: int, plain: int) -> bool:
    """Whether ``coded`` bytes in ``blocks`` blocks, with their manifest record, are fewer than ``plain``."""
    return coded + RECORD_BYTES + BLOCK_RECORD_BYTES * (blocks - 1) < plain


FRAME_BYTES: Final = 16  # a zstd frame's header and block headers, about
CODER_SLACK: Final = 1.05  # measured: on spread-out codes the frames are within 1-5 % of the entropy


def estimated_bytes(entropy_bits: float, n: int, bits: int, p_max: float, block: int = BLOCK) -> int:
    """What coding ``n`` codes of ``bits`` bits would take on disk, from their order-0 entropy
    (``entropy_bits`` in all) and the share of the most frequent code, or their plain packed
    size when coding would not pay (as the encoder decides): for pricing candidates before any
    is coded (bit allocation; the pack's measured size is what a budget is checked against).

    The frames Huffman-code the aligned bytes (``k`` codes each, iid): a byte costs its entropy
    plus Gallager's bound on Huffman's redundancy (p + 0.086 for a symbol of probability
    p ≥ 1/2), at least one bit; bytes that are mostly one value take about a bit (more than
    90 %) or become runs (more than 99 %). Within about 10 % of the coder on Laplace- and
    normal-shaped task vectors at 1-8 bits (tests/test_allocate.py)."""
    plain = packed_nbytes(n, bits)
    if n == 0:
        return plain
    per_byte = 8 // aligned_bits(bits)
    aligned = aligned_nbytes(n, bits)
    byte_entropy = per_byte * entropy_bits / n
    p_byte = p_max**per_byte
    if p_byte > 0.99:  # runs of one byte: matches, not literals
        cost = byte_entropy * CODER_SLACK
    elif p_byte > 0.9:  # one short Huffman code for the common byte, matches on its runs: about a bit
        cost = max(byte_entropy * CODER_SLACK, 1.0)
    else:
        cost = max(byte_entropy * CODER_SLACK + (p_byte + 0.086 if p_byte >= 0.5 else 0.0), 1.0)
    blocks = max(len(block_lengths(aligned, block)), 1)
    coded = math.ceil(cost * aligned / 8) + FRAME_BYTES * blocks
    return coded if pays(coded, blocks, plain) else plain


def aligned_bits(bits: int) -> int:
    """The byte-aligned width codes of ``bits`` bits are coded at: 1, 2, 4 or 8."""
    for width in (1, 2, 4, 8):
        if bits <= width:
            return width
    raise ValueError(f"{bits}-bit codes are wider than a byte")


def aligned_nbytes(n: int, bits: int) -> int:
    """Bytes of ``n`` codes laid out byte-aligned: what a coded stream decodes to."""
    return packed_nbytes(n, aligned_bits(bits))


def block_lengths(total: int, block: int) -> list[int]:
    """The decoded length of each block of a stream of ``total`` bytes."""
    return [min(block, total - start) for start in range(0, total, block)]


def to_aligned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Packed codes (the pack's layout) -> the byte-aligned layout (the same tensor when equal)."""
    width = aligned_bits(bits)
    return packed if width == bits else pack_codes(unpack_codes(packed, bits, n), width)


def codes_from_aligned(aligned: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` codes (flat uint8) of a decoded byte-aligned stream, checked to fit ``bits``
    bits (a field of 4 or 8 bits can hold a larger value; nothing may decode outside the codes)."""
    codes = unpack_codes(aligned, aligned_bits(bits), n)
    if aligned_bits(bits) != bits and n and int(codes.max()) >= 1 << bits:
        raise StreamError(f"decodes to code {int(codes.max())}, outside {bits}-bit codes")
    return codes


def packed_from_aligned(aligned: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The pack's packed codes of a decoded byte-aligned stream."""
    return aligned if aligned_bits(bits) == bits else pack_codes(codes_from_aligned(aligned, bits, n), bits)


def _compressor(strong: bool = False, block: int = BLOCK) -> zstandard.ZstdCompressor:
    """The frames' parameters: fast (level 1, long matches only), or zstd's optimal parser
    (``strong``: level 19 sized to one block, so its window never exceeds what a reader allows)."""
    flags = {"write_checksum": False, "write_content_size": True, "write_dict_id": False, "threads": 0}
    if strong:
        params = zstandard.ZstdCompressionParameters.from_level(_STRONG_LEVEL, source_size=block, **flags)
    else:
        params = zstandard.ZstdCompressionParameters.from_level(_LEVEL, min_match=_MIN_MATCH, **flags)
    return zstandard.ZstdCompressor(compression_params=params)


def encode(aligned: torch.Tensor, block: int = BLOCK, strong: bool = False) -> tuple[torch.Tensor, Coded]:
    """Code a byte-aligned stream: the coded bytes (flat uint8) and their record (``strong``:
    smaller frames from zstd's optimal parser, the same format, ~10-30x slower to write)."""
    data = memoryview(aligned.reshape(-1).contiguous().numpy().tobytes())
    cctx = _compressor(strong, block)
    frames = [cctx.compress(data[start : start + block]) for start in range(0, len(data), block)]
    out = np.frombuffer(b"".join(frames), dtype=np.uint8).copy()
    return torch.from_numpy(out), Coded(block, [len(f) for f in frames])


def decode(stream: torch.Tensor, blocks: list[int], block: int, total: int) -> torch.Tensor:
    """The ``total`` byte-aligned bytes that ``stream`` (blocks of the recorded coded sizes, each
    decoding to ``block`` bytes, the last to the rest) stands for; :class:`StreamError` if not."""
    lengths = block_lengths(total, block)
    if len(blocks) != len(lengths) or sum(blocks) != stream.numel():
        raise StreamError(f"{len(blocks)} blocks of {sum(blocks)} bytes for a stream of {stream.numel()} bytes and {len(lengths)} blocks")
    data = memoryview(stream.reshape(-1).contiguous().numpy().tobytes())
    out = torch.empty(total, dtype=torch.uint8)
    view = out.numpy()
    dctx = zstandard.ZstdDecompressor(max_window_size=max(block, 1 << 10))  # no frame may ask for more memory
    at = start = 0
    for i, (size, length) in enumerate(zip(blocks, lengths, strict=True)):
        frame = data[at : at + size]
        view[start : start + length] = np.frombuffer(_frame(dctx, frame, length, i), dtype=np.uint8)
        at += size
        start += length
    return out


def _frame(dctx: zstandard.ZstdDecompressor, frame: memoryview, length: int, i: int) -> bytes:
    """One block: a single whole frame that declares, and decodes to, exactly ``length`` bytes."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise StreamError(f"block {i}: not a zstd frame") from None
    if declared != length:
        raise StreamError(f"block {i}: frame declares {declared} bytes, expected {length}")
    obj = dctx.decompressobj(write_size=max(length, 1))
    try:
        raw = obj.decompress(frame)
    except zstandard.ZstdError as exc:
        raise StreamError(f"block {i}: corrupt frame ({str(exc)[:120]})") from None
    if not obj.eof or obj.unused_data or len(raw) != length:
        raise StreamError(f"block {i}: frame is truncated, too long or decodes to {len(raw)} bytes, expected {length}")
    return raw


# -- exactly stored tensors: bit-shuffled blocks ---------------------------------------------
def _transpose8(x: np.ndarray) -> np.ndarray:
    """Transpose the 8x8 bit matrix in each little-endian uint64 (byte i, bit j -> byte j, bit i),
    in place (Hacker's Delight 7-3); its own inverse."""
    t = np.empty_like(x)
    for shift, mask in ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0)):
        np.right_shift(x, np.uint64(shift), out=t)
        t ^= x
        t &= np.uint64(mask)
        x ^= t
        t <<= np.uint64(shift)
        x ^= t
    return x


def bitshuffle(data: np.ndarray, itemsize: int) -> np.ndarray:
    """One block of elements of ``itemsize`` bytes (flat uint8, a whole number of elements) with
    its bits regrouped: for the first ``m8`` elements (``m`` rounded down to a multiple of 8), for
    each byte ``p`` of an element (little-endian) and each bit ``b`` of that byte, the bits ``b`` of
    byte ``p`` of every element, 8 to a byte (element ``8c + i`` in bit ``i`` of byte ``c``); then
    the bytes of the remaining ``m - m8`` elements as they are. Same length as ``data``."""
    m = data.size // itemsize
    m8 = m - m % 8
    head = data[: m8 * itemsize].reshape(m8 // 8, 8, itemsize).transpose(2, 0, 1)  # plane, chunk, element
    x = _transpose8(head.copy().view("<u8").reshape(itemsize, m8 // 8))
    planes = x.view(np.uint8).reshape(itemsize, m8 // 8, 8).transpose(0, 2, 1)  # plane, bit, chunk
    return np.concatenate([planes.reshape(-1), data[m8 * itemsize :]])


def unbitshuffle(data: np.ndarray, itemsize: int) -> np.ndarray:
    """The inverse of :func:`bitshuffle`: the block's element bytes."""
    m = data.size // itemsize
    m8 = m - m % 8
    planes = data[: m8 * itemsize].reshape(itemsize, 8, m8 // 8).transpose(0, 2, 1)  # plane, chunk, bit
    x = _transpose8(planes.copy().view("<u8").reshape(itemsize, m8 // 8))
    elements = x.view(np.uint8).reshape(itemsize, m8 // 8, 8).transpose(1, 2, 0)  # chunk, element, plane
    return np.concatenate([elements.reshape(-1), data[m8 * itemsize :]])


def encode_raw_bytes(data: torch.Tensor, block: int = BLOCK, strong: bool = False) -> tuple[torch.Tensor, Coded]:
    """Code the bytes of a tensor stored exactly: each block of ``block`` bytes bit-shuffled
    (elements of ``data.element_size()`` bytes) and one zstd frame. The coded bytes (flat uint8)
    and their record (``filter`` "bitshuffle"); ``strong``: the strong level for every block."""
    itemsize = data.element_size()
    if block % itemsize:
        raise ValueError(f"block {block} is not a whole number of {itemsize}-byte elements")
    flat = data.detach().reshape(-1).contiguous()
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, dtype=np.uint8)
    level = _RAW_LEVEL_SMALL if strong or raw.size <= _RAW_SMALL else _RAW_LEVEL
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True, write_dict_id=False)
    frames = [cctx.compress(bitshuffle(raw[start : start + block], itemsize).tobytes()) for start in range(0, raw.size, block)]
    out = np.frombuffer(b"".join(frames), dtype=np.uint8).copy()
    return torch.from_numpy(out), Coded(block, [len(f) for f in frames], BITSHUFFLE)


def decode_raw_bytes(stream: torch.Tensor, blocks: list[int], block: int, total: int, itemsize: int) -> torch.Tensor:
    """The ``total`` bytes (flat uint8) of a tensor coded by :func:`encode_raw_bytes`; :class:`StreamError`
    if the stream does not decode to them (see :func:`decode`)."""
    if block % itemsize or total % itemsize:
        raise StreamError(f"blocks of {block} bytes or {total} bytes in all are not whole {itemsize}-byte elements")
    shuffled = decode(stream, blocks, block, total).numpy()
    out = torch.empty(total, dtype=torch.uint8)
    view = out.numpy()
    for start in range(0, total, block):
        view[start : start + block] = unbitshuffle(shuffled[start : start + block], itemsize)
    return out
