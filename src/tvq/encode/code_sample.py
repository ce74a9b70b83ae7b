"""A fixed scheme's coded size, measured on a sample of its codes before the pack is written.

The bit allocation prices every candidate from its codes' order-0 entropy with a margin for the
coder (``tvq.quant.entropy.estimated_bytes``), so an anchor whose estimate is a few percent over
the budget may still fit once written, and is tried: a whole pack written, measured and dropped
when it does not. Here, before that, the anchor's own codes are made for a sample of every
tensor (evenly spread runs of up to ``SAMPLE_BYTES`` aligned bytes per task: the whole tensor when
it is smaller) with the anchor's exact parameters (min–max over the whole task vector, known from
the analysis), coded by the pack's coder itself, and scaled to the tensor, so a pack that cannot
fit is not written. Reads only those runs of the inputs.
"""

from __future__ import annotations

import math

import torch

from tvq.io.readers import CheckpointReader
from tvq.quant import affine, entropy
from tvq.quant.packing import pack_codes, packed_nbytes
from tvq.quant.schemes import get_scheme

SAMPLE_BYTES = 1 << 18  # aligned bytes coded per tensor and task at most (256 KiB: a few ms of zstd)
RUNS = 8  # contiguous runs the sample is made of, evenly spread over the tensor


def spans(n: int, bits: int, sample_bytes: int = SAMPLE_BYTES) -> list[tuple[int, int]]:
    """The runs of codes ``[start, end)`` sampled from ``n`` codes of ``bits`` bits: all of them
    when they take at most ``sample_bytes`` aligned bytes, else ``RUNS`` runs of whole bytes."""
    per_byte = 8 // entropy.aligned_bits(bits)
    if entropy.aligned_nbytes(n, bits) <= sample_bytes:
        return [(0, n)]
    run = sample_bytes // RUNS * per_byte
    last = (n - run) // per_byte
    return [(i * last // (RUNS - 1) * per_byte, i * last // (RUNS - 1) * per_byte + run) for i in range(RUNS)]


def coded_bytes(pre: CheckpointReader, finetuned: CheckpointReader, key: str, bits: int, lo: float, hi: float, strong: bool = False,
                sample_bytes: int = SAMPLE_BYTES) -> int:  # fmt: skip
    """The bytes the min–max TVQ codes of τ = θ_ft − θ_pre (range ``[lo, hi]``: the whole τ's) take
    in a pack with entropy coding on: measured where the sample is the whole tensor, else the
    sample's coded share of its aligned bytes times the tensor's; the packed size (and no record)
    where coding would not pay, as the encoder decides. 0 for a constant (stored without codes).
    ``strong``: coded as ``--entropy max`` codes them."""
    if lo == hi:
        return 0
    n = pre.meta(key).numel
    qp = affine.params_from_minmax(get_scheme("minmax", bits).spec(bits, {}), lo, hi)
    theta, base = finetuned.get(key).reshape(-1), pre.get(key).reshape(-1)
    runs = spans(n, bits, sample_bytes)
    parts = [theta[a:b].float() - base[a:b].float() for a, b in runs]
    codes = affine.quantize(torch.cat(parts), qp)
    sampled = codes.numel()
    aligned = entropy.to_aligned(pack_codes(codes, bits), bits, sampled)
    total = entropy.aligned_nbytes(n, bits)
    plain = packed_nbytes(n, bits)
    if sampled == n:  # the whole tensor, in the coder's own blocks: exact
        stream, record = entropy.encode(aligned, strong=strong)
        coded, blocks = stream.numel(), len(record.blocks)
    else:
        stream, _ = entropy.encode(aligned, block=max(entropy.MIN_BLOCK, 1 << math.ceil(math.log2(aligned.numel()))), strong=strong)
        blocks = max(len(entropy.block_lengths(total, entropy.BLOCK)), 1)
        coded = math.ceil((stream.numel() - entropy.FRAME_BYTES) * total / aligned.numel()) + entropy.FRAME_BYTES * blocks
    return coded if entropy.pays(coded, blocks, plain) else plain
