"""The compiled kernels (tvq.quant.kernels) write the torch path's bytes: codes, packing,
parameters, reconstructions, the RTVQ base and the entropy coder's layout; refusals name the
same task; only the error statistics may differ, by the torch path's fp32 rounding."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tvq.encode.options import QuantizeOptions
from tvq.encode.pipeline import quantize
from tvq.encode.rtvq import encode_residual
from tvq.encode.tvq import encode_differences
from tvq.errors import EncodeError
from tvq.quant import kernels
from tvq.quant.affine import QuantSpec
from tvq.quant.chunks import Converted, Mean
from tvq.quant.entropy import to_aligned
from tvq.quant.fused import QuantResult
from tvq.quant.packing import pack_codes

pytest.importorskip("numba")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
STAT_REL = 2e-5  # the torch path's fp32 dot products (MKL), against the kernels' exact fp64 sums


@pytest.fixture(autouse=True)
def every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small tensors take the kernels too (normally they keep the torch path)."""
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)
    monkeypatch.delenv(kernels.ENV, raising=False)


def reference(fn, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``fn()`` on the torch path."""
    monkeypatch.setenv(kernels.ENV, "torch")
    try:
        return fn()
    finally:
        monkeypatch.delenv(kernels.ENV)


def inputs(n: int, tasks: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pre = (torch.randn(n, generator=g) * 0.02).to(dtype)
    return pre, [(pre.float() + torch.randn(n, generator=g) * 1e-3 * (t + 1)).to(dtype) for t in range(tasks)]


def bits_of(x: float) -> str:
    return float(x).hex() if not math.isnan(x) else "nan"  # keeps the sign of a zero


def assert_same(ref: list[QuantResult], got: list[QuantResult] | None, stats: bool = True) -> None:
    assert got is not None
    assert len(ref) == len(got)
    for r, g in zip(ref, got, strict=True):
        assert {k: bits_of(v) for k, v in r.params.scalars.items()} == {k: bits_of(v) for k, v in g.params.scalars.items()}
        assert (r.params.constant is None) == (g.params.constant is None)
        if r.params.constant is not None and g.params.constant is not None:
            assert bits_of(r.params.constant) == bits_of(g.params.constant)
        assert (r.packed is None) == (g.packed is None)
        if r.packed is not None and g.packed is not None:
            assert torch.equal(r.packed, g.packed)
        if stats:
            assert g.sq_err == pytest.approx(r.sq_err, rel=STAT_REL, abs=1e-30)
            assert g.sq_ref == pytest.approx(r.sq_ref, rel=STAT_REL, abs=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 4095, 4097, 3 * 4096 + 5, 70_001])
def test_tvq_matches_the_torch_path(dtype: torch.dtype, bits: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    pre, fts = inputs(n, 2, dtype, seed=bits * 1000 + n)
    ref = reference(lambda: encode_differences(fts, pre, bits), monkeypatch)
    assert_same(ref, kernels.encode_minmax(fts, pre, QuantSpec(bits)))


def test_statistics_are_exact_sums() -> None:
    pre, fts = inputs(300_001, 1, torch.bfloat16, seed=3)
    (got,) = kernels.encode_minmax(fts, pre, QuantSpec(2)) or []
    tau = (fts[0].double() - pre.double()).float().double()
    assert got.sq_ref == pytest.approx(float((tau * tau).sum()), rel=1e-12)


def test_mixed_input_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    pre, fts = inputs(10_000, 3, torch.float32, seed=5)
    fts = [fts[0].bfloat16(), fts[1].half(), fts[2]]
    ref = reference(lambda: encode_differences(fts, pre.bfloat16(), 4), monkeypatch)
    assert_same(ref, kernels.encode_minmax(fts, pre.bfloat16(), QuantSpec(4)))


def test_constants_and_signed_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    """τ = 0 everywhere (an unchanged tensor), a constant τ, and −0 in τ (θ = −0, θ_pre = +0),
    where which zero the torch path's min/max keep reaches the manifest."""
    pre = torch.arange(5_000, dtype=torch.float32) / 1024
    pre[:10] = 0.0
    negzero = pre.clone()
    negzero[3] = -0.0  # τ[3] = −0 − (+0) = −0
    nonneg = pre.clone()
    nonneg[100:] += 1.0
    nonneg[5] = -0.0
    fts = [pre.clone(), pre + 0.25, negzero, nonneg, -nonneg + 2 * pre]
    for bits in (1, 4, 8):
        ref = reference(lambda bits=bits: encode_differences(fts, pre, bits), monkeypatch)
        assert_same(ref, kernels.encode_minmax(fts, pre, QuantSpec(bits)))
        assert ref[0].params.constant == 0.0 and ref[1].params.constant == 0.25


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_naming_the_torch_path_s_task(bad: float, monkeypatch: pytest.MonkeyPatch) -> None:
    pre, fts = inputs(20_000, 3, torch.float32, seed=1)
    fts[2][1_000] = bad  # chunk 0 of task 2 ...
    fts[0][9_000] = bad  # ... before chunk 2 of task 0: the torch path (chunk-major) names task 2
    with pytest.raises(EncodeError) as expected:
        reference(lambda: encode_differences(fts, pre, 4, chunk=4096), monkeypatch)
    with pytest.raises(EncodeError) as got:
        kernels.encode_minmax(fts, pre, QuantSpec(4), chunk=4096)
    assert (got.value.problem, got.value.task) == (expected.value.problem, expected.value.task) == (expected.value.problem, 2)


def test_an_overflowing_task_vector_and_an_unquantizable_range(monkeypatch: pytest.MonkeyPatch) -> None:
    pre = torch.zeros(10_000)
    pre[7] = -3e38
    over = pre.clone()
    over[7] = 3e38  # τ = 6e38: Inf in fp32
    narrow = torch.zeros(10_000)
    narrow[0] = 1e-44  # a range fp32 cannot quantize (255 / 1e-44 overflows the scale)
    for fts, base in (([pre.clone(), over], pre), ([narrow], torch.zeros(10_000))):
        with pytest.raises(EncodeError) as expected:
            reference(lambda fts=fts, base=base: encode_differences(fts, base, 8), monkeypatch)
        with pytest.raises(EncodeError) as got:
            kernels.encode_minmax(fts, base, QuantSpec(8))
        assert (got.value.problem, got.value.task) == (expected.value.problem, expected.value.task)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("error_correction", [True, False])
@pytest.mark.parametrize("tasks", [2, 5])
def test_rtvq_base_and_offsets(dtype: torch.dtype, error_correction: bool, tasks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    pre, fts = inputs(9_001, tasks, dtype, seed=tasks)
    ref_base, ref_offsets = reference(lambda: encode_residual(fts, pre, 2, 3, error_correction), monkeypatch)
    base, offsets = encode_residual(fts, pre, 2, 3, error_correction)
    assert ref_base is not None and base is not None
    assert_same([ref_base], [base])
    assert_same(ref_offsets, offsets)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tasks", [2, 3, 4, 5, 9])
def test_the_base_difference_is_the_torch_mean_bit_for_bit(dtype: torch.dtype, tasks: int) -> None:
    pre, fts = inputs(10_001, tasks, dtype, seed=tasks)
    fts[0][:3] = torch.tensor([-0.0, 0.0, -0.0]).to(dtype)
    pre[:3] = torch.tensor([0.0, -0.0, -0.0]).to(dtype)
    mean, pre32 = Mean(fts, 1024), Converted(pre, 1024)
    expected = torch.cat([torch.sub(mean(s, min(s + 1024, 10_001)), pre32(s, min(s + 1024, 10_001))) for s in range(0, 10_001, 1024)])
    got = torch.empty(10_001)
    assert kernels.base_difference(fts, pre, got)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 4097, 100_003])
def test_realigned_is_the_entropy_coder_s_layout(bits: int, n: int) -> None:
    packed = pack_codes(torch.randint(0, 1 << bits, (n,), dtype=torch.uint8), bits)
    got = kernels.realigned(packed, bits, n)
    assert got is not None and torch.equal(got, to_aligned(packed, bits, n))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5_000),
    bits=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6]),
    zeros=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_random_tensors_match(n: int, bits: int, dtype: torch.dtype, scale: float, zeros: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pre = (torch.randn(n, generator=g) * scale).to(dtype)
    ft = (pre.float() + torch.randn(n, generator=g) * scale * 0.1).to(dtype)
    if zeros:  # runs of unchanged values and signed zeros
        ft[: n // 2] = pre[: n // 2]
        ft[::7] = -0.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "MIN_ELEMENTS", 0)
        try:
            mp.setenv(kernels.ENV, "torch")
            ref: list[QuantResult] | EncodeError = encode_differences([ft], pre, bits)
        except EncodeError as exc:
            ref = exc
        mp.delenv(kernels.ENV)
        if isinstance(ref, EncodeError):
            with pytest.raises(EncodeError) as got:
                kernels.encode_minmax([ft], pre, QuantSpec(bits))
            assert got.value.problem == ref.problem
        else:
            assert_same(ref, kernels.encode_minmax([ft], pre, QuantSpec(bits)))


def test_threads_share_the_kernels() -> None:
    """The kernels release the GIL and keep no shared state: concurrent calls, the same results."""
    pre, fts = inputs(200_000, 2, torch.bfloat16, seed=9)
    expected = kernels.encode_minmax(fts, pre, QuantSpec(4))
    results: list[list[QuantResult] | None] = [None] * 4

    def run(i: int) -> None:
        results[i] = kernels.encode_minmax(fts, pre, QuantSpec(4))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        assert expected is not None and got is not None
        assert all(torch.equal(a.packed, b.packed) and a.sq_err == b.sq_err for a, b in zip(expected, got, strict=True))  # type: ignore[arg-type]


def test_off_small_or_not_applicable(monkeypatch: pytest.MonkeyPatch) -> None:
    pre, fts = inputs(1_000, 1, torch.float32, seed=2)
    assert kernels.encode_minmax(fts, pre.double(), QuantSpec(4)) is None  # fp64: the torch path's exact convention
    assert kernels.encode_minmax(fts, pre, QuantSpec(4, block_size=128)) is None
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 1 << 16)
    assert kernels.encode_minmax(fts, pre, QuantSpec(4)) is None
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.encode_minmax(fts, pre, QuantSpec(4)) is None


def test_without_a_writable_cache_the_kernels_compile_per_process() -> None:
    class NoCache:
        @staticmethod
        def njit(cache: bool = False, **options: object):  # type: ignore[no-untyped-def]
            if cache:
                raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
            return lambda fn: ("compiled", fn, options)

    def f() -> None: ...

    assert kernels._jit(NoCache, f)[0] == "compiled"


def _model(folder: Path, dtype: torch.dtype) -> tuple[Path, dict[str, Path]]:
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(96, 80, generator=g) * 0.02 for i in range(3)}
    base["norm.weight"] = torch.ones(80)
    base["frozen.weight"] = torch.randn(40, 30, generator=g)
    save_file({k: v.to(dtype).contiguous() for k, v in base.items()}, folder / "base.safetensors")
    fts = {}
    for t in range(3):
        ft = {k: (v + torch.randn(v.shape, generator=g) * 1e-3 if k != "frozen.weight" else v) for k, v in base.items()}
        fts[f"task{t}"] = folder / f"ft{t}.safetensors"
        save_file({k: v.to(dtype).contiguous() for k, v in ft.items()}, fts[f"task{t}"])
    return folder / "base.safetensors", fts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "options",
    [QuantizeOptions(bits=4), QuantizeOptions(bits=2), QuantizeOptions(bits=2, residual=True, base_bits=3, error_correction=True)],
    ids=["tvq4", "tvq2", "rtvq-b3o2-ec"],
)
def test_a_pack_is_byte_identical(tmp_path: Path, dtype: torch.dtype, options: QuantizeOptions, monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = _model(tmp_path, dtype)
    reference(lambda: quantize(base, fts, tmp_path / "torch", options, progress=False), monkeypatch)
    quantize(base, fts, tmp_path / "kernel", options, progress=False)
    files = sorted(p.relative_to(tmp_path / "torch") for p in (tmp_path / "torch").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(tmp_path / "kernel") for p in (tmp_path / "kernel").rglob("*.safetensors"))
    for name in files:
        assert (tmp_path / "torch" / name).read_bytes() == (tmp_path / "kernel" / name).read_bytes(), name
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("torch", "kernel"))
    for task_a, task_b in zip(a.pop("tasks"), b.pop("tasks"), strict=True):
        for key in ("rel_error", "rel_error_quantized"):
            assert task_b.pop(key) == pytest.approx(task_a.pop(key), rel=STAT_REL)
        assert task_a == task_b
    a.pop("digest", None), b.pop("digest", None)
    assert a == b
