"""The entropy coder of codes (tvq.quant.entropy): lossless on any codes, and every malformed
stream is a StreamError, never a crash, a hang or an allocation beyond the recorded length."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq.quant.entropy import (
    BLOCK,
    MIN_BLOCK,
    StreamError,
    aligned_bits,
    aligned_nbytes,
    block_lengths,
    codes_from_aligned,
    decode,
    encode,
    packed_from_aligned,
    to_aligned,
)
from tvq.quant.packing import pack_codes, packed_nbytes


@st.composite
def code_arrays(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """Codes of 1-8 bits, skewed like a task vector's (most near the middle) or uniform."""
    bits = draw(st.integers(1, 8))
    n = draw(st.integers(0, 3 * MIN_BLOCK))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([0.0, 0.05, 0.3, 10.0]))
    g = np.random.default_rng(seed)
    top = (1 << bits) - 1
    values = np.clip(np.rint(top / 2 + g.normal(0, spread * (top + 1), n)), 0, top) if spread < 10 else g.integers(0, top + 1, n)
    return torch.from_numpy(values.astype(np.uint8)), bits


def _coded(codes: torch.Tensor, bits: int, block: int = MIN_BLOCK) -> tuple[torch.Tensor, list[int], int]:
    aligned = to_aligned(pack_codes(codes, bits), bits, codes.numel())
    stream, record = encode(aligned, block)
    return stream, record.blocks, aligned.numel()


@settings(max_examples=60, deadline=None)
@given(code_arrays())
def test_roundtrip_gives_back_the_packed_codes_and_the_codes(case: tuple[torch.Tensor, int]) -> None:
    codes, bits = case
    n = codes.numel()
    packed = pack_codes(codes, bits)
    stream, blocks, total = _coded(codes, bits)
    assert total == aligned_nbytes(n, bits) and len(blocks) == len(block_lengths(total, MIN_BLOCK))
    aligned = decode(stream, blocks, MIN_BLOCK, total)
    assert torch.equal(packed_from_aligned(aligned, bits, n), packed)  # what plain-packed readers consume
    assert torch.equal(codes_from_aligned(aligned, bits, n), codes)


def test_byte_aligned_widths_code_the_packed_bytes_themselves() -> None:
    codes = torch.randint(0, 4, (1000,), dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    assert to_aligned(packed, 2, 1000) is packed
    assert [aligned_bits(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert aligned_nbytes(1001, 3) == packed_nbytes(1001, 4)


def test_skewed_codes_shrink_near_their_entropy() -> None:
    """Codes of a Laplace-like task vector at 2 bits: the coded size is within 10 % of the order-0
    entropy of the bytes, and far below plain packing."""
    g = torch.Generator().manual_seed(0)
    x = torch.empty(1 << 20).exponential_(generator=g) - torch.empty(1 << 20).exponential_(generator=g)
    codes = torch.clamp(torch.round(x / x.abs().max() * 1.5 + 1.5), 0, 3).to(torch.uint8)
    packed = pack_codes(codes, 2)
    stream, blocks, _ = _coded(codes, 2, BLOCK)
    counts = np.bincount(packed.numpy(), minlength=256)
    p = counts[counts > 0] / counts.sum()
    entropy_bytes = float(-(p * np.log2(p)).sum()) * counts.sum() / 8
    assert stream.numel() < 0.6 * packed.numel()
    assert stream.numel() < 1.1 * entropy_bytes


def _one_stream(n: int = 12 * MIN_BLOCK, bits: int = 2) -> tuple[torch.Tensor, list[int], int]:
    codes = torch.clamp(torch.randn(n, generator=torch.Generator().manual_seed(1)) + 1.5, 0, (1 << bits) - 1).round().to(torch.uint8)
    return _coded(codes, bits)


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda s, b: (s[:-1], [*b[:-1], b[-1] - 1]), "truncated|corrupt"),
        (lambda s, b: (torch.cat([s, torch.zeros(3, dtype=torch.uint8)]), [*b[:-1], b[-1] + 3]), "too long"),
        (lambda s, b: (s, [b[0] + 1, b[1] - 1, *b[2:]]), "truncated|too long|corrupt|not a zstd frame|declares"),
        (lambda s, b: (s, b[:-1]), "blocks"),
        (lambda s, b: (s[: sum(b[:-1])], b), "blocks"),
        (lambda s, b: (torch.full_like(s, 0x41), b), "not a zstd frame"),
    ],
)
def test_malformed_streams_are_refused_with_a_reason(mutate, problem: str) -> None:
    stream, blocks, total = _one_stream()
    bad, bad_blocks = mutate(stream.clone(), list(blocks))
    with pytest.raises(StreamError, match=problem):
        decode(bad, bad_blocks, MIN_BLOCK, total)


def test_a_frame_declaring_another_length_is_refused_before_decoding() -> None:
    """A zip bomb: a frame of a few bytes declaring 1 GiB. Refused from its header (nothing of
    that size is allocated), as is a frame declaring less than its block."""
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 22))  # 4 MiB of zeros in a few hundred bytes
    for frame, total in [(bomb, MIN_BLOCK), (zstandard.ZstdCompressor().compress(bytes(10)), MIN_BLOCK)]:
        data = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
        with pytest.raises(StreamError, match="declares"):
            decode(data, [len(frame)], MIN_BLOCK, total)


def test_a_frame_without_its_length_or_with_a_large_window_is_refused() -> None:
    chunks = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(MIN_BLOCK))
    with pytest.raises(StreamError, match="declares"):
        decode(torch.frombuffer(bytearray(chunks), dtype=torch.uint8), [len(chunks)], MIN_BLOCK, MIN_BLOCK)


def test_wider_fields_cannot_smuggle_codes_outside_the_width() -> None:
    """3-bit codes travel in 4-bit fields: a stream whose fields hold 8-15 decodes to an error."""
    aligned = torch.full((MIN_BLOCK,), 0xF7, dtype=torch.uint8)  # codes 7 and 15
    stream, record = encode(aligned, MIN_BLOCK)
    decoded = decode(stream, record.blocks, MIN_BLOCK, MIN_BLOCK)
    with pytest.raises(StreamError, match="outside 3-bit codes"):
        codes_from_aligned(decoded, 3, 2 * MIN_BLOCK)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_random_corruption_decodes_right_or_fails_cleanly(data: st.DataObject) -> None:
    stream, blocks, total = _one_stream(4 * MIN_BLOCK + 7, bits=3)
    bad = stream.clone()
    for _ in range(data.draw(st.integers(1, 4))):
        bad[data.draw(st.integers(0, bad.numel() - 1))] = data.draw(st.integers(0, 255))
    try:
        out = decode(bad, blocks, MIN_BLOCK, total)
    except StreamError:
        return
    assert out.numel() == total  # a corruption zstd cannot see yields bytes of the right length
