"""Dense bit packing: exact layout, exact size, lossless round trips for every b."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq.quant.packing import pack_codes, pack_float_codes, packed_nbytes, unpack_codes


def test_layout_is_little_endian_bit_stream():
    # 2-bit codes 1,2,3,0 -> bits 01 10 11 00 from the low end -> 0b00111001
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3-bit codes 5,7,1: stream bits 0-2 = 101, 3-5 = 111, 6-8 = 001 -> byte0 0b01111101, byte1 0
    assert pack_codes(torch.tensor([5, 7, 1], dtype=torch.uint8), 3).tolist() == [0b01111101, 0]
    # a code straddling bytes: code 2 = 4 (0b100) puts its top bit at stream bit 8
    assert pack_codes(torch.tensor([0, 0, 4], dtype=torch.uint8), 3).tolist() == [0, 1]
    # 1-bit: 8 codes per byte
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b10000001]


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_round_trip_and_size(bits: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_large_tensor_crosses_chunks():
    codes = torch.randint(0, 8, (2**21 * 8 + 13,), dtype=torch.int64).to(torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, codes.numel()), codes)


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_packing_from_float_codes_gives_the_integer_paths_bytes(bits: int, n: int, seed: int):
    """The matrix-vector packing of fp32 codes (used by the fused encoder) is byte-identical,
    including the highest codes (the largest group values) and ragged lengths."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.int16)
    if n:
        codes[: n // 3] = 2**bits - 1
    out = torch.full((packed_nbytes(n, bits),), 0xA5, dtype=torch.uint8)
    pack_float_codes(codes.float(), bits, out)
    assert torch.equal(out, pack_codes(codes, bits))
