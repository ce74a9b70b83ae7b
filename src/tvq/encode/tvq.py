"""TVQ: each task vector τ_t = θ_t − θ_pre quantized on its own grid (the paper's method).

Two conventions, as packs have always recorded them. Streamed (the paper's min–max, the
default): each operand is converted to fp32 and τ_t formed a chunk at a time
(``CHUNK`` elements per error-statistics sum). Exact (every other quantizer, and FQ): τ_t is
θ_t − θ_pre in the inputs' precision (fp64 stays fp64 until quantized) and the statistics
are summed per ``STAT_CHUNK``. For fp32, fp16 and bf16 inputs the quantized values agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tvq.encode.checks import KeyInputs
from tvq.encode.job import KeyCodes
from tvq.quant.affine import QuantSpec
from tvq.quant.chunks import CHUNK, STAT_CHUNK, AsFloat32, ChunkSource, Converted, View, difference
from tvq.quant.fused import Measure, QuantResult, encode_chunks
from tvq.quant.kernels import encode_minmax
from tvq.quant.schemes import Quantizer
from tvq.quant.stored import stored_form


def operand(t: torch.Tensor, exact_fp64: bool, chunk: int) -> ChunkSource:
    """θ_t as the minuend of a difference: converted to fp32 first, or (exact) as stored."""
    return View(t) if exact_fp64 else Converted(t, chunk)


def encode_differences(
    minuends: Sequence[torch.Tensor],
    subtrahend: torch.Tensor,
    bits: int | QuantSpec,
    *,
    pretrained: torch.Tensor | None = None,
    base_hat: torch.Tensor | None = None,
    chunk: int = CHUNK,
    exact_fp64: bool = False,
) -> list[QuantResult]:
    """Quantize x_t = minuends[t] − subtrahend (fp32 arithmetic) with ``bits`` (a width of the
    paper's min–max, or any quantizer).

    The error is measured against τ_t = minuends[t] − ``pretrained`` (default: the subtrahend,
    i.e. x_t is τ_t) with the reconstruction ``base_hat`` + x̂_t, or x̂_t compared with x_t.
    The paper's min–max of x_t = τ_t runs in the compiled kernels (tvq.quant.kernels) where
    they apply: the same codes and parameters, statistics summed more exactly."""
    spec = as_spec(bits)
    if pretrained is None and not exact_fp64:
        fast = encode_minmax(minuends, subtrahend, spec, chunk=chunk)
        if fast is not None:
            return fast
    sub = Converted(subtrahend, chunk)
    thetas = [operand(m, exact_fp64, chunk) for m in minuends]
    diffs = [difference(theta, sub, chunk) for theta in thetas]
    measure = Measure(taus=diffs)
    if pretrained is not None:
        pre = Converted(pretrained, chunk)
        hat = Converted(base_hat, chunk) if base_hat is not None else None
        measure = Measure([difference(theta, pre, chunk) for theta in thetas], plus=hat, against_x=hat is None)
    xs = [AsFloat32(d, chunk) for d in diffs]
    return encode_chunks(xs, subtrahend.numel(), spec, measure=measure, chunk=chunk)


def encode_tvq(inputs: KeyInputs, q: Quantizer, streams: bool, chunk: int | None = None) -> KeyCodes:
    """Every task's τ_t of one tensor (``chunk``: elements per chunk, None: the convention's)."""
    chunk = chunk or (CHUNK if streams else STAT_CHUNK)
    codes = encode_differences(inputs.thetas, inputs.pre, q.spec, chunk=chunk, exact_fp64=not streams)
    return stored_codes(inputs, codes, q.scheme)


def stored_codes(inputs: KeyInputs, codes: Sequence[QuantResult], scheme: str) -> KeyCodes:
    """Each task's encoding in its stored form, with its error statistics."""
    shape = list(inputs.pre.shape)
    out = KeyCodes()
    for name, code in zip(inputs.fts, codes, strict=True):
        out.stored[name] = stored_form(code, shape, scheme)
        out.errors[name] = (code.sq_err, code.sq_ref)
    return out


def as_spec(bits: int | QuantSpec) -> QuantSpec:
    return bits if isinstance(bits, QuantSpec) else QuantSpec(bits)
