"""An independent transcription of the paper's official algorithm (AIM-SKKU/TVQ), for tests.

It works the way the original scripts do: whole state dicts in memory, one byte per code,
scale and zero point as 0-dim tensors, the official key rule. tvq must match it bit for bit.
"""

from __future__ import annotations

import torch


def paper_selected(key: str) -> bool:
    return "weight" in key and "ln_" not in key and "token_embedding.weight" not in key


def asymmetric_quantization(x: torch.Tensor, qbit: int):
    x_min, x_max = x.min(), x.max()
    qmin, qmax = 0, 2**qbit - 1
    scale = (qmax - qmin) / (x_max - x_min)
    zero_point = -1 * torch.round(scale * x_min)
    q = torch.round(scale * x + zero_point).clamp(qmin, qmax)
    return q.to(torch.uint8), scale, zero_point


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q.to(torch.float) - zero_point.to(torch.float)) / scale


def paper_tvq(pre: dict, ft: dict, bits: int) -> dict:
    """Reconstructed task vector of the paper's TVQ loader (QuantizedTaskVector)."""
    out = {}
    for key in pre:
        tv = ft[key] - pre[key]
        if not paper_selected(key):
            out[key] = tv
            continue
        out[key] = dequantize(*asymmetric_quantization(tv, bits))
    return out


def paper_fq(pre: dict, ft: dict, bits: int) -> dict:
    """QuantizedFinetunedModel: deq(Q(θ_ft)) − θ_pre."""
    out = {}
    for key in pre:
        w = ft[key] if not paper_selected(key) else dequantize(*asymmetric_quantization(ft[key], bits))
        out[key] = w - pre[key]
    return out


def paper_rtvq(pre: dict, fts: list[dict], base_bits: int, bits: int, error_correction: bool) -> list[dict]:
    """QuantizedBaseAndTaskVector with the averaged model of get_avg_model_statedict."""
    sums = {k: torch.zeros_like(v) for k, v in pre.items()}
    for ft in fts:
        for k in pre:
            sums[k] += ft[k]
    avg = {k: sums[k] / len(fts) for k in sums}
    base_deq, reference = {}, avg
    for key in pre:
        beta = avg[key] - pre[key]
        base_deq[key] = dequantize(*asymmetric_quantization(beta, base_bits)) if paper_selected(key) else beta
    if error_correction:
        reference = {k: base_deq[k] + pre[k] for k in pre}
    outs = []
    for ft in fts:
        tv = {}
        for key in pre:
            off = ft[key] - reference[key]
            off_deq = dequantize(*asymmetric_quantization(off, bits)) if paper_selected(key) else off
            tv[key] = base_deq[key] + off_deq
        outs.append(tv)
    return outs
