"""Dense bit packing of b-bit codes, b = 1..8.

Layout (documented in docs/pack-format.md): code i occupies bits [i*b, (i+1)*b) of a
little-endian bit stream, where stream bit k is bit (k % 8) of byte k // 8. So 8/b codes
share a byte for b in {1, 2, 4, 8}, and 3-, 5-, 6-, 7-bit codes straddle bytes with no
waste. A tensor of n codes takes exactly ceil(n*b/8) bytes. b in {1, 2, 4} packs with
uint8 shifts and ors (5x faster than the general path); other widths go through groups
of 8 codes <-> b bytes in int64. Both are chunked so temporaries stay cache-sized.
"""

from __future__ import annotations

import torch

_GROUP_CHUNK = 1 << 15  # groups of 8 codes per chunk (256 Ki codes): temporaries stay cache-sized
_BYTE_CHUNK = 1 << 18  # output bytes per chunk of the uint8 fast path
_BYTE_ALIGNED = (1, 2, 4)


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def _padded(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    """``flat`` (uint8) zero-padded to a multiple of ``multiple`` elements; no copy when aligned."""
    pad = (-flat.numel()) % multiple
    if not pad:
        return flat
    out = torch.zeros(flat.numel() + pad, dtype=torch.uint8, device=flat.device)
    out[: flat.numel()] = flat
    return out


def _pack_bytewise(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b in {1, 2, 4}: byte j = OR over s of code[j*per + s] << (s*b), by merging neighbours.

    Codes are widened to int16; viewing two neighbours as one int32 (a + b·2^16), the low 16
    bits of ``w | w >> (16 - f)`` are a | b << f, fields of width 2f. Halving until fields are
    8 bits wide gives the bytes with contiguous int32 ops, which AVX2 vectorizes (strided
    uint8 ops, the obvious way, are 2-5x slower in torch)."""
    per = 8 // bits
    n = codes.numel()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=codes.device)
    for start in range(0, n, _BYTE_CHUNK * per):
        part = codes[start : start + _BYTE_CHUNK * per]
        if part.numel() % per:
            part = _padded(part.to(torch.uint8), per)
        fields = part.to(torch.int16)
        width = bits
        while width < 8:
            wide = fields.view(torch.int32)
            fields = (wide | (wide >> (16 - width))).to(torch.int16)  # narrowing keeps the low 16 bits
            width *= 2
        at = start // per
        out[at : at + fields.numel()] = fields  # int16 -> uint8 keeps the low byte
    return out


def _unpack_bytewise(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bytewise`: column s of ``[bytes, 8/b]`` is (byte >> s·b) & mask,
    one strided write per column (1.8x faster than a broadcast shift then a mask)."""
    per, mask = 8 // bits, (1 << bits) - 1
    out = torch.empty(packed.numel(), per, dtype=torch.uint8, device=packed.device)
    for s in range(per):
        column = out[:, s]
        if s == 0:
            torch.bitwise_and(packed, mask, out=column)
        elif s == per - 1:  # the top field: the shift alone clears the other bits
            torch.bitwise_right_shift(packed, s * bits, out=column)
        else:
            torch.bitwise_and(torch.bitwise_right_shift(packed, s * bits), mask, out=column)
    return out.view(-1)[:n]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat integer tensor (uint8 or int16) of codes < 2^bits into ceil(n*bits/8) bytes."""
    codes = codes.reshape(-1)
    if bits == 8:
        return codes.to(torch.uint8).clone()
    if bits in _BYTE_ALIGNED:
        return _pack_bytewise(codes, bits)
    return _pack_grouped(codes, bits)


_FLOAT_GROUPS = {1: 8, 2: 4, 3: 8, 4: 2}  # codes per group whose packed value is < 2^24, exact in fp32
_FLOAT_WEIGHTS: dict[tuple[int, torch.device], torch.Tensor] = {}  # per width and device


def pack_float_codes(q: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack codes held as exact integers in fp32 (a quantizer's rounded output) into ``out``
    (uint8, ``packed_nbytes(q.numel(), bits)`` bytes), as :func:`pack_codes` would.

    For 1, 2, 3 and 4 bits a group of codes packs with one matrix-vector product, Σ q_s·2^(s·b):
    every product and partial sum is an integer below 2^24, exact in fp32 in any order, so
    the bytes are those of the integer path, with no int16 copy of the codes and no shifts
    (1.7x faster per chunk). Other widths, and a ragged tail, take the integer path."""
    per = _FLOAT_GROUPS.get(bits)
    if per is None or q.numel() % per:
        out.copy_(pack_codes(q.to(torch.int16), bits))
        return
    weights = _FLOAT_WEIGHTS.get((bits, q.device))
    if weights is None:
        weights = _FLOAT_WEIGHTS.setdefault((bits, q.device), torch.tensor([float(1 << (s * bits)) for s in range(per)], device=q.device))
    group_values = torch.mv(q.view(-1, per), weights)
    if per * bits == 8:  # one byte per group
        out.copy_(group_values.to(torch.int16))  # fp32 -> int16 -> uint8 beats fp32 -> uint8 in torch
    else:  # 3 bits: 24-bit groups, the low three bytes of each int32 (little-endian)
        out.view(-1, 3).copy_(group_values.to(torch.int32).view(torch.uint8).view(-1, 4)[:, :3])


def _merge_pairs(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Neighbouring fields (a, b) of ``width`` bits -> a | b << width, in the next wider dtype.

    ``fields`` is int16 or int32; viewed one size up, a pair is a + b·2^(16 or 32), so the low
    half is a and the high half b (all values are non-negative). Contiguous integer ops only."""
    wide = fields.view(torch.int32 if fields.dtype == torch.int16 else torch.int64)
    half = 16 if fields.dtype == torch.int16 else 32
    low = wide & ((1 << half) - 1)
    return low.bitwise_or_((wide >> half) << width)


def _pack_grouped(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b in {3, 5, 6, 7}: 8 codes -> one int64 of 8b bits (three pair merges), whose low b bytes
    are the group's bytes in the little-endian stream (2-7x faster than int64 shift-and-sum)."""
    n = codes.numel()
    groups = (n + 7) // 8
    out = torch.empty(groups, bits, dtype=torch.uint8, device=codes.device)
    for start in range(0, groups, _GROUP_CHUNK):
        part = codes[start * 8 : (start + _GROUP_CHUNK) * 8]
        if part.numel() % 8:
            part = _padded(part.to(torch.uint8), 8)
        level1 = _merge_pairs(part.to(torch.int16), bits).to(torch.int16)  # 2b <= 14 bits
        level2 = _merge_pairs(level1, 2 * bits)  # int32, 4b <= 28 bits
        level3 = _merge_pairs(level2, 4 * bits)  # int64, 8b <= 56 bits
        rows = level3.view(torch.uint8).view(-1, 8)
        out[start : start + rows.shape[0]] = rows[:, :bits]
    return out.reshape(-1)[: packed_nbytes(n, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as a flat uint8 tensor."""
    packed = packed.reshape(-1)
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"expected {packed_nbytes(n, bits)} packed bytes for {n} {bits}-bit codes, got {packed.numel()}")
    if bits == 8:
        return packed.clone()
    if bits in _BYTE_ALIGNED:
        return _unpack_bytewise(packed, bits, n)
    groups = (n + 7) // 8
    padded = _padded(packed, bits).view(groups, bits)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    mask = (1 << bits) - 1
    out = torch.empty(groups, 8, dtype=torch.uint8, device=packed.device)
    for start in range(0, groups, _GROUP_CHUNK):
        part = padded[start : start + _GROUP_CHUNK].to(torch.int64)
        word = (part << byte_shifts).sum(dim=1, keepdim=True)
        out[start : start + _GROUP_CHUNK] = ((word >> shifts) & mask).to(torch.uint8)
    return out.reshape(-1)[:n].clone()
