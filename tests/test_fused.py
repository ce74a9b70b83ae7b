"""The fused, chunked min-max encoder writes exactly the plain path's codes and parameters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq.encode.tvq import encode_differences
from tvq.quant.chunks import sq_error
from tvq.quant.stored import encode_quantized


def _inputs(n: int, tasks: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pre = (torch.randn(n, generator=g) * 0.02).to(dtype)
    fts = [(pre.float() + torch.randn(n, generator=g) * 1e-3 * (t + 1)).to(dtype) for t in range(tasks)]
    return pre, fts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_tvq_codes_match_the_plain_path(dtype: torch.dtype, bits: int) -> None:
    pre, fts = _inputs(10_007, 3, dtype, seed=bits)  # 10,007: chunks of 1,024 leave a ragged tail
    codes = encode_differences(fts, pre, bits, chunk=1024)
    for t, code in zip(fts, codes, strict=True):
        tau = t.float() - pre.float()
        stored, recon = encode_quantized(tau, bits)
        assert torch.equal(code.packed, stored.data)
        assert {"scale": code.params.scale, "zero_point": code.params.zero_point} == stored.params
        err, ref = sq_error(tau, recon)
        assert code.sq_err == pytest.approx(err, rel=1e-4)
        assert code.sq_ref == pytest.approx(ref, rel=1e-4)


def test_rtvq_offsets_and_error_against_the_pretrained_model() -> None:
    pre, fts = _inputs(5_000, 4, torch.bfloat16, seed=7)
    pre32 = pre.float()
    beta_hat = torch.randn(5_000) * 1e-4
    reference = beta_hat + pre32
    codes = encode_differences(fts, reference, 2, pretrained=pre, base_hat=beta_hat, chunk=512)
    for t, code in zip(fts, codes, strict=True):
        stored, offset_hat = encode_quantized(t - reference, 2)
        assert torch.equal(code.packed, stored.data)
        err, ref = sq_error(t - pre32, beta_hat, offset_hat)
        assert code.sq_err == pytest.approx(err, rel=1e-4)
        assert code.sq_ref == pytest.approx(ref, rel=1e-4)


def test_a_constant_difference_is_stored_as_a_constant() -> None:
    pre = torch.arange(3_000, dtype=torch.float32) / 1024  # dyadic: θ + 0.25 - θ is exactly 0.25
    codes = encode_differences([pre + 0.25, pre * 2], pre, 4, chunk=256)
    assert codes[0].packed is None and codes[0].params.constant == pytest.approx(0.25)
    assert codes[0].sq_err == pytest.approx(0.0, abs=1e-6)
    assert codes[1].packed is not None


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3_000), bits=st.integers(1, 8), chunk=st.sampled_from([8, 64, 1024]), seed=st.integers(0, 1000))
def test_any_size_and_chunking_gives_the_same_codes(n: int, bits: int, chunk: int, seed: int) -> None:
    pre, fts = _inputs(n, 2, torch.bfloat16, seed)
    code = encode_differences(fts[:1], pre, bits, chunk=chunk)[0]
    stored, _ = encode_quantized(fts[0].float() - pre.float(), bits)
    if stored.kind == "const":
        assert code.packed is None and code.params.constant == stored.value
    else:
        assert torch.equal(code.packed, stored.data)


@pytest.mark.parametrize("error_correction", [True, False])
@pytest.mark.parametrize("identical", [False, True])
def test_fused_rtvq_matches_the_plain_base_and_offsets(error_correction: bool, identical: bool) -> None:
    from tvq.encode.rtvq import encode_residual
    from tvq.quant.chunks import mean_of

    pre, fts = _inputs(9_001, 4, torch.bfloat16, seed=11)
    if identical:  # a tensor no task changed: θ_avg is θ_0 exactly
        fts = [fts[0].clone() for _ in fts]
    pre32 = pre.float()
    avg = mean_of(fts)
    stored_base, beta_hat = encode_quantized(avg - pre32, 3)
    reference = beta_hat + pre32 if error_correction else avg
    base, offsets = encode_residual(fts, pre, 2, 3, error_correction, chunk=1024)
    if stored_base.kind == "const":
        assert base.packed is None and base.params.constant == stored_base.value
    else:
        assert torch.equal(base.packed, stored_base.data)
    for t, code in zip(fts, offsets, strict=True):
        stored, offset_hat = encode_quantized(t - reference, 2)
        if stored.kind == "const":
            assert code.packed is None and code.params.constant == stored.value
        else:
            assert torch.equal(code.packed, stored.data)
        err, ref = sq_error(t - pre32, beta_hat, offset_hat)
        assert code.sq_err == pytest.approx(err, rel=1e-4, abs=1e-12)
        assert code.sq_ref == pytest.approx(ref, rel=1e-4)
