"""Dense bit packing of b-bit codes, b = 1..8.

Layout (documented in docs/pack-format.md): code i occupies bits [i*b, (i+1)*b) of a
little-endian bit stream, where stream bit k is bit (k % 8) of byte k // 8. So 8/b codes
share a byte for b in {1, 2, 4, 8}, and 3-, 5-, 6-, 7-bit codes straddle bytes with no
waste. A tensor of n codes takes exactly ceil(n*b/8) bytes. Implemented as groups of
8 codes <-> b bytes, vectorised and chunked so temporaries stay bounded.
"""

from __future__ import annotations

import torch

_GROUP_CHUNK = 1 << 15  # groups of 8 codes per chunk (256 Ki codes): temporaries stay cache-sized


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of codes < 2^bits into ceil(n*bits/8) bytes."""
    codes = codes.reshape(-1)
    n = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8).clone()
    groups = (n + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.uint8)
    padded[:n] = codes
    padded = padded.view(groups, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = torch.empty(groups, bits, dtype=torch.uint8)
    for start in range(0, groups, _GROUP_CHUNK):
        part = padded[start : start + _GROUP_CHUNK].to(torch.int64)
        word = (part << shifts).sum(dim=1, keepdim=True)  # disjoint bit ranges: sum == or
        out[start : start + _GROUP_CHUNK] = ((word >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.reshape(-1)[: packed_nbytes(n, bits)].clone()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as a flat uint8 tensor."""
    packed = packed.reshape(-1)
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"expected {packed_nbytes(n, bits)} packed bytes for {n} {bits}-bit codes, got {packed.numel()}")
    if bits == 8:
        return packed.clone()
    groups = (n + 7) // 8
    padded = torch.zeros(groups * bits, dtype=torch.uint8)
    padded[: packed.numel()] = packed
    padded = padded.view(groups, bits)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    mask = (1 << bits) - 1
    out = torch.empty(groups, 8, dtype=torch.uint8)
    for start in range(0, groups, _GROUP_CHUNK):
        part = padded[start : start + _GROUP_CHUNK].to(torch.int64)
        word = (part << byte_shifts).sum(dim=1, keepdim=True)
        out[start : start + _GROUP_CHUNK] = ((word >> shifts) & mask).to(torch.uint8)
    return out.reshape(-1)[:n].clone()
