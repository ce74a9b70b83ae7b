"""RTVQ: a shared base β = θ_avg − θ_pre at more bits, then each task's offset at fewer.

The base is encoded here (θ_avg streamed from the inputs, or the average already computed
for writing it) or, when tasks are added to a pack, read back as that pack stored it. The
offset of task t is θ_t − ref, where ref = β̂ + θ_pre with error correction (and always for a
stored base) and θ_avg without. Errors are of τ_t = θ_t − θ_pre against τ̂_t = β̂ + ô_t,
except that an error-corrected offset against a base encoded here, streamed, is measured as
|ô_t − o_t|² (equal up to fp32 rounding, two passes cheaper): as packs have always recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from tvq.encode.checks import KeyInputs
from tvq.encode.job import BASE, KeyCodes
from tvq.encode.tvq import as_spec, operand, stored_codes
from tvq.errors import EncodeError
from tvq.io.stamps import input_stamp
from tvq.pack.reader import Pack, open_pack
from tvq.quant.affine import QuantSpec
from tvq.quant.chunks import CHUNK, STAT_CHUNK, AsFloat32, Converted, Elementwise, Mean, difference, scratch
from tvq.quant.fused import Measure, QuantResult, encode_chunks
from tvq.quant.kernels import base_difference, encode_minmax
from tvq.quant.schemes import Quantizer
from tvq.quant.stored import stored_form


def encode_residual(
    finetuned: Sequence[torch.Tensor],
    pretrained: torch.Tensor,
    bits: int | QuantSpec,
    base_bits: int | QuantSpec,
    error_correction: bool,
    chunk: int = CHUNK,
    *,
    average: torch.Tensor | None = None,
    base_hat: torch.Tensor | None = None,
    exact_fp64: bool = False,
) -> tuple[QuantResult | None, list[QuantResult]]:
    """The base (None when ``base_hat`` is given) and every offset, with widths or quantizers
    ``base_bits`` and ``bits``. β, then β̂ in its place, is held in full (fp32: β is formed
    once, not in each pass); θ_avg (unless given), ref and the offsets exist a chunk at a time.
    A base that cannot be encoded is an EncodeError with ``base=True``; an offset, with its
    task's index."""
    n = pretrained.numel()
    pre = Converted(pretrained, chunk)
    avg = Converted(average, chunk) if average is not None else Mean(finetuned, chunk)
    base = None
    if base_hat is None:
        beta = scratch(n, pretrained.device)
        compiled = isinstance(avg, Mean) and not avg.identical and base_difference(finetuned, pretrained, beta)
        for start in range(0, n, chunk) if not compiled else ():  # else formed by the compiled kernels, the same bits
            end = min(start + chunk, n)
            torch.sub(avg(start, end), pre(start, end), out=beta[start:end])
        try:  # β̂ overwrites β chunk by chunk: each chunk of β is spent before its reconstruction lands
            fast = encode_minmax([beta], None, as_spec(base_bits), stats=False, recon=beta, chunk=chunk)
            (base,) = fast or encode_chunks([Converted(beta, chunk)], n, as_spec(base_bits), recon_out=beta, chunk=chunk)
        except EncodeError as exc:
            raise exc.at(base=True) from None
        base_hat = beta
    shortcut = error_correction and base is not None and average is None and not exact_fp64
    if shortcut and (fast := encode_minmax(finetuned, pretrained, as_spec(bits), hat=base_hat, ref_tau=True, chunk=chunk)) is not None:
        return base, fast  # the compiled kernels (tvq.quant.kernels): the same codes
    hat = Converted(base_hat.to(pretrained.device), chunk)
    reference = avg if base is not None and not error_correction else Elementwise(torch.add, hat, pre, chunk)
    thetas = [operand(t, exact_fp64, chunk) for t in finetuned]
    xs = [AsFloat32(difference(theta, reference, chunk), chunk) for theta in thetas]
    taus = [difference(theta, pre, chunk) for theta in thetas]
    measure = Measure(taus, against_x=True) if shortcut else Measure(taus, plus=hat)
    return base, encode_chunks(xs, n, as_spec(bits), measure=measure, chunk=chunk)


def encode_rtvq(inputs: KeyInputs, q: Quantizer, base_q: Quantizer, error_correction: bool, streams: bool, *,
                average: torch.Tensor | None = None, base_pack: str | None = None, chunk: int | None = None) -> KeyCodes:  # fmt: skip
    """Every task's offset of one tensor, and the base unless it comes from ``base_pack``."""
    base_hat = stored_base(base_pack, inputs.key) if base_pack is not None else None
    base, offsets = encode_residual(inputs.thetas, inputs.pre, q.spec, base_q.spec, error_correction,
                                    chunk or (CHUNK if streams else STAT_CHUNK), average=average, base_hat=base_hat,
                                    exact_fp64=not streams)  # fmt: skip
    out = stored_codes(inputs, offsets, q.scheme)
    if base is not None:
        out.stored[BASE] = stored_form(base, list(inputs.pre.shape), base_q.scheme)
    return out


@lru_cache(maxsize=8)
def _open_pack_cached(path: str, stamp: tuple[int, int]) -> Pack:
    return open_pack(path)


def stored_base(pack_path: str, key: str) -> torch.Tensor:
    """deq(Q(β)) of ``key`` as the pack at ``pack_path`` stores it (opened once per version)."""
    p = Path(pack_path)
    return _open_pack_cached(str(p), input_stamp(p / "manifest.json")).base_tensor(key)
