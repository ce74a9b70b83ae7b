"""Dense bit packing: exact layout, exact size, lossless round trips for every b."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq.quant import packing
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


# ---- an independent oracle: numpy's bit (un)packing in little-endian bit order -------------


def reference_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """The documented layout, built bit by bit: code i's ``bits`` low bits, least significant
    first, are stream bits [i*b, (i+1)*b); stream bit k is bit k % 8 of byte k // 8."""
    code_bits = np.unpackbits(codes.astype(np.uint8).reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
    return np.packbits(code_bits.reshape(-1), bitorder="little")


def reference_unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first ``n`` codes of the stream (bits after n*b, the last byte's padding, are ignored)."""
    stream = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: n * bits]
    return np.packbits(stream.reshape(n, bits), axis=1, bitorder="little").reshape(n)


@st.composite
def codes_and_bits(draw) -> tuple[list[int], int]:
    bits = draw(st.integers(1, 8))
    return draw(st.lists(st.integers(0, 2**bits - 1), max_size=300)), bits


@settings(max_examples=300, deadline=None)
@given(case=codes_and_bits())
def test_pack_and_unpack_match_numpy_bit_stream(case: tuple[list[int], int]):
    values, bits = case
    codes = np.array(values, dtype=np.uint8)
    expected = reference_pack(codes, bits)
    packed = pack_codes(torch.from_numpy(codes), bits)
    assert packed.numpy().tobytes() == expected.tobytes()
    assert np.array_equal(reference_unpack(expected, bits, len(codes)), codes)  # the oracle inverts itself
    assert unpack_codes(torch.from_numpy(expected), bits, len(codes)).numpy().tobytes() == codes.tobytes()
    as_int16 = pack_codes(torch.from_numpy(codes).to(torch.int16), bits)  # the encoders' code dtype
    assert as_int16.numpy().tobytes() == expected.tobytes()


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), data=st.data())
def test_unpack_reads_any_bytes_as_numpy_does(bits: int, n: int, data):
    """Any bytes, the last one's padding bits set too: each code is read from its own bits only."""
    raw = data.draw(st.binary(min_size=packed_nbytes(n, bits), max_size=packed_nbytes(n, bits)))
    packed = np.frombuffer(raw, dtype=np.uint8)
    got = unpack_codes(torch.from_numpy(packed.copy()), bits, n)
    assert got.numpy().tobytes() == reference_unpack(packed, bits, n).tobytes()


@pytest.mark.parametrize("bits", range(1, 9))
def test_numpy_oracle_across_chunks(bits: int):
    """Lengths past the chunk sizes of both integer paths, ragged at the end."""
    codes_per_chunk = packing._BYTE_CHUNK * 8 // bits if bits in (1, 2, 4) else packing._GROUP_CHUNK * 8
    n = codes_per_chunk + 8 * 1000 + 13
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    expected = reference_pack(codes.numpy(), bits)
    packed = pack_codes(codes, bits)
    assert packed.numpy().tobytes() == expected.tobytes()
    assert torch.equal(unpack_codes(torch.from_numpy(expected), bits, n), codes)


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
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (2**21 * 8 + 13,), generator=g, dtype=torch.int64).to(torch.uint8)
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
