"""The bit allocation's analysis streams (issue 15, part 2): the same numbers bit for bit as
summarising whole tensors, in bounded memory, and the same table with threads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import tvq.encode.budget as budget
from tvq.encode.options import QuantizeOptions
from tvq.errors import CheckpointError, EncodeError
from tvq.quant.error_model import ValueStats


def _same(a: ValueStats, b: ValueStats) -> None:
    assert (a.lo, a.hi, a.numel, a.width) == (b.lo, b.hi, b.numel, b.width)
    for name in ("count", "total", "squares"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("numel", [0, 1, 5000, 12345])
def test_streamed_stats_are_those_of_the_whole_tensor(dtype, numel):
    g = torch.Generator().manual_seed(numel)
    pre = (torch.randn(numel, generator=g) * 0.02).to(dtype)
    ft = (pre.double() + torch.randn(numel, generator=g).double() * 1e-3).to(dtype)
    for sample in (64, 4096, 1 << 20):  # a strided sample, and every value in chunks
        whole = ValueStats.of(ft.float() - pre.float(), bins=512, sample=sample)
        source = budget.difference(budget.Converted(ft, 700), budget.Converted(pre, 700), 700)
        _same(ValueStats.streamed(source, numel, bins=512, sample=sample, chunk=700), whole)
    _same(budget._streamed_stats(ft, pre), ValueStats.of(ft.float() - pre.float()))
    _same(budget._streamed_stats(ft, None), ValueStats.of(ft.float()))


def test_streamed_stats_refuse_what_the_quantizers_refuse():
    x = torch.zeros(3000)
    x[2500] = float("nan")
    with pytest.raises(EncodeError):
        budget._streamed_stats(x, torch.zeros(3000))
    with pytest.raises(EncodeError):
        budget._streamed_stats(torch.zeros(3000), x)


@pytest.fixture
def family(tmp_path):
    """bf16 inputs with tensors past the histogram's sample (strided) and below it (chunked)."""
    g = torch.Generator().manual_seed(1)
    shapes = {"big.weight": (3000, 1500), "mid.weight": (512, 600), "frozen.weight": (256, 256), "norm.weight": (64,)}
    pre = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(pre, tmp_path / "pre.safetensors")
    fts = {}
    for t in range(3):
        ft = {k: v if k.startswith("frozen") else (v.float() + torch.randn(v.shape, generator=g) * 1e-3 * (t + 1)).to(v.dtype)
              for k, v in pre.items()}  # fmt: skip
        save_file(ft, tmp_path / f"t{t}.safetensors")
        fts[f"t{t}"] = tmp_path / f"t{t}.safetensors"
    return tmp_path / "pre.safetensors", fts


def _table(analysis):
    table, fixed, n = analysis
    return fixed, n, {k: [(o.bits, o.base_bits, o.nbytes, o.error.hex(), o.scheme) for o in v] for k, v in table.items()}


@pytest.mark.parametrize("options", [QuantizeOptions(bits=2), QuantizeOptions(bits=2, quantizer="mse"),
                                     QuantizeOptions(bits=4, target="finetuned")], ids=["minmax", "mse", "fq"])  # fmt: skip
def test_the_streamed_analysis_is_the_whole_tensor_one_in_any_thread_count(family, options, monkeypatch):
    pre, fts = family
    streamed = _table(budget.analyse(pre, fts, options.validated(), progress=False))
    assert _table(budget.analyse(pre, fts, options.validated(), progress=False, threads=2)) == streamed

    # the whole-tensor summaries the analysis gave before it streamed
    def whole(thetas, pre_t):
        return [ValueStats.of(theta.float() - pre_t.float() if pre_t is not None else theta.float()) for theta in thetas]

    monkeypatch.setattr(budget, "_streamed_stats_all", whole)
    assert _table(budget.analyse(pre, fts, options.validated(), progress=False)) == streamed


def test_the_streamed_analysis_names_the_bad_input(family, tmp_path):
    pre, fts = family
    from safetensors.torch import load_file

    bad = load_file(fts["t1"])
    bad["big.weight"][1000, 3] = float("inf")
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        budget.analyse(pre, {**fts, "t1": tmp_path / "bad.safetensors"}, QuantizeOptions(bits=2).validated(), progress=False, threads=2)


@pytest.mark.parametrize("path", ["torch", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bin_counts_are_those_of_the_whole_tensor_expression(dtype, path, monkeypatch):
    import tvq.quant.error_model as error_model
    from tvq.quant import histogram

    monkeypatch.setattr(error_model, "INDEX_BLOCK", 3000)  # several blocks and chunks per block
    monkeypatch.setattr(error_model, "CHUNK", 700)
    if path == "numba":
        pytest.importorskip("numba")
        monkeypatch.setattr(histogram, "MIN_ELEMENTS", 0)
        monkeypatch.delenv(histogram.ENV, raising=False)
        assert histogram.counter(1) is not None
    else:
        monkeypatch.setenv(histogram.ENV, "torch")
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(10_007, generator=g, dtype=torch.float64) * 1e-3).to(dtype)
    x[:4] = torch.tensor([0.0, -0.0, float(x.min()), float(x.max())], dtype=torch.float64).to(dtype)
    lo, hi = float(x.min()), float(x.max())
    for bins in (7, 512, 1 << 16):
        width = (hi - lo) / bins
        for parts in ([x], [x[::3]], [x[5:5]], [x[:2999], x[2999:5000], x[5000:]]):
            expected = sum(torch.bincount(((p.float() - lo) * (1.0 / width)).to(torch.int64).clamp_(0, bins - 1), minlength=bins)
                           for p in parts)  # fmt: skip
            counts, sampled = error_model.bin_counts(iter(parts), lo, width, bins)
            assert torch.equal(counts, expected) and sampled == sum(p.numel() for p in parts)


def test_streamed_all_shares_an_operand_and_gives_each_sources_numbers():
    g = torch.Generator().manual_seed(4)
    pre = (torch.randn(9000, generator=g) * 0.02).to(torch.bfloat16)
    fts = [(pre.float() + torch.randn(9000, generator=g) * 1e-3 * (t + 1)).to(torch.bfloat16) for t in range(3)]
    for sample in (500, 1 << 20):
        shared = budget.Converted(pre, 700)
        sources = [budget.difference(budget.Converted(ft, 700), shared, 700) for ft in fts]
        got = ValueStats.streamed_all(sources, 9000, bins=256, sample=sample, chunk=700)
        for stats, ft in zip(got, fts, strict=True):
            _same(stats, ValueStats.of(ft.float() - pre.float(), bins=256, sample=sample))


@pytest.mark.parametrize("options", [QuantizeOptions(bits=2, residual=True, error_correction=True),
                                     QuantizeOptions(bits=2, residual=True, error_correction=True, quantizer="mse"),
                                     QuantizeOptions(bits=2, residual=True, quantizer="mse")], ids=["ec", "ec-mse", "mse"])  # fmt: skip
def test_the_rtvq_analysis_of_stored_inputs_is_that_of_their_fp32_copies(family, tmp_path, options):
    """The RTVQ analysis reads each θ_t as stored and converts where it computes (no fp32 copies),
    streams the error-corrected offsets and summarises β once: the numbers of the fp32 inputs."""
    from safetensors.torch import load_file

    pre, fts = family
    as_fp32 = {}
    for name, path in {"pre": pre, **fts}.items():
        save_file({k: v.float() for k, v in load_file(path).items()}, tmp_path / f"{name}32.safetensors")
        as_fp32[name] = tmp_path / f"{name}32.safetensors"
    pre32 = as_fp32.pop("pre")
    stored = _table(budget.analyse(pre, fts, options.validated(), progress=False, cross=True, threads=2))
    fp32 = _table(budget.analyse(pre32, as_fp32, options.validated(), progress=False, cross=True))
    assert stored[2] == fp32[2]


def test_the_streamed_offsets_are_the_whole_offsets():
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(300, 700, generator=g) * 1e-3 for _ in range(3)]
    beta_hat = torch.randn(300, 700, generator=g) * 1e-4
    for options in (QuantizeOptions(bits=2), QuantizeOptions(bits=2, quantizer="mse")):
        got = budget._offset_costs(taus, beta_hat, (1, 2, 4), options, 100)
        assert got == budget._grid_costs([t - beta_hat for t in taus], (1, 2, 4), options, 100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("numel", [20_000, 9_000, 50_001])
def test_the_compiled_passes_give_the_torch_numbers(dtype, numel, monkeypatch):
    """Two compiled passes over the stored inputs (range, then the sample's bins) summarise a task
    vector bit for bit as torch does, with every value or a dense or sparse sample; values torch
    must judge (a non-finite one, a zero end) are left to it."""
    pytest.importorskip("numba")
    from tvq.quant import error_model, histogram

    monkeypatch.setattr(histogram, "MIN_ELEMENTS", 0)
    monkeypatch.delenv(histogram.ENV, raising=False)
    g = torch.Generator().manual_seed(numel)
    pre = (torch.randn(numel, generator=g) * 0.02).to(dtype)
    ft = (pre.float() + torch.randn(numel, generator=g) * 1e-3).to(dtype)
    for sample in (1 << 20, 10_000, 4_000, 1_000):  # steps 1, 2–5, 12–50: the dense and the sparse sample
        for args, whole in (((ft, pre), ft.float() - pre.float()), ((ft, None), ft.float())):
            stats = error_model.compiled_stats(*args, bins=512, sample=sample)
            assert stats is not None
            _same(stats, ValueStats.of(whole, bins=512, sample=sample))
    bad = ft.clone()
    bad[7] = float("inf")
    assert error_model.compiled_stats(bad, pre) is None and error_model.compiled_stats(pre, pre) is None  # Inf; all zero
    other = pre.float() if dtype != torch.float32 else pre.bfloat16()
    assert error_model.compiled_stats(ft.double(), pre.double()) is None and error_model.compiled_stats(ft, other) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quantizer", ["minmax", "mse"])
def test_the_compiled_offsets_give_the_torch_numbers(dtype, quantizer, monkeypatch):
    """RTVQ with error correction by compiled passes over the stored inputs: β, every base width's
    bytes, and each task's offsets τ_t − β̂ summarised as the torch passes summarise them (every
    value, a dense and a sparse sample), bit for bit; an input torch must judge is left to it."""
    pytest.importorskip("numba")
    from tvq.quant import histogram
    from tvq.quant.chunks import mean_of

    monkeypatch.setattr(histogram, "MIN_ELEMENTS", 0)
    monkeypatch.delenv(histogram.ENV, raising=False)
    g = torch.Generator().manual_seed(3)
    numel = 30_011
    pre = (torch.randn(numel, generator=g) * 0.02).to(dtype)
    fts = [(pre.float() + torch.randn(numel, generator=g) * 1e-3 * (t + 1)).to(dtype) for t in range(3)]
    options = QuantizeOptions(bits=2, residual=True, base_bits=3, error_correction=True, quantizer=quantizer).validated()
    bases = (2, 3, 8)
    for sample in (1 << 20, 10_000, 1_000):
        found = budget._compiled_offset_stats(pre, fts, options, bases, 100, sample=sample, rtvq_sample=sample)
        assert found is not None
        cross, beta_stats, priced = found
        taus = [t.float() - pre.float() for t in fts]
        for got, tau in zip(cross, taus, strict=True):
            _same(got, ValueStats.of(tau, sample=sample))
        beta = mean_of(fts) - pre.float()
        _same(beta_stats, ValueStats.of(beta, sample=sample))
        for bb in bases:
            beta_hat, nbytes = budget._base_estimate(beta, bb, options, 100, beta_stats)
            assert priced[bb][0] == nbytes
            for got, tau in zip(priced[bb][1], taus, strict=True):
                _same(got, ValueStats.of(tau - beta_hat, sample=sample))
    same = budget._compiled_offset_stats(pre, [fts[0]] * 3, options, bases, 100)  # the mean of equal tensors is the first
    assert same is not None
    _same(same[1], ValueStats.of(fts[0].float() - pre.float()))
    frozen = budget._compiled_offset_stats(pre, [fts[0], pre, fts[2]], options, bases, 100)  # a task that left it alone: τ = 0
    assert frozen is not None
    _same(frozen[0][1], ValueStats.of(torch.zeros(numel)))
    bad = fts[1].clone()
    bad[11] = float("inf")
    assert budget._compiled_offset_stats(pre, [fts[0], bad, fts[2]], options, bases, 100) is None  # torch names it
    assert budget._compiled_offset_stats(pre, [fts[0], fts[1].double(), fts[2]], options, bases, 100) is None


@pytest.mark.parametrize("options", [QuantizeOptions(bits=2, residual=True, error_correction=True),
                                     QuantizeOptions(bits=2, residual=True, error_correction=True, quantizer="mse")],
                         ids=["ec", "ec-mse"])  # fmt: skip
def test_the_compiled_rtvq_analysis_is_the_torch_one(family, options, monkeypatch):
    pytest.importorskip("numba")
    from tvq.quant import histogram

    pre, fts = family
    monkeypatch.setenv(histogram.ENV, "torch")
    reference = _table(budget.analyse(pre, fts, options.validated(), progress=False, cross=True))
    monkeypatch.setattr(histogram, "MIN_ELEMENTS", 0)
    monkeypatch.delenv(histogram.ENV)
    assert _table(budget.analyse(pre, fts, options.validated(), progress=False, cross=True, threads=2)) == reference


def test_every_grid_of_many_statistics_at_once_is_each_ones():
    """``ValueStats.best_of_all`` prices many tensors' grids in one go: the numbers of ``best``
    on each, bit for bit (min–max and every MSE clip factor, constants among them), and the same
    error for a grid float32 cannot hold."""
    from tvq.quant.affine import QuantSpec, RangeEstimator
    from tvq.quant.error_model import mse_clips

    g = torch.Generator().manual_seed(11)
    stats = [ValueStats.of(torch.randn(n, generator=g) * 10.0 ** -(i % 5) + (1e-3 if i % 3 == 0 else 0.0))
             for i, n in enumerate([1000, 50_000, 300_000, 7, 4096, 123_457])]  # fmt: skip
    stats.insert(2, ValueStats.of(torch.zeros(100)))
    for bits in (1, 2, 3, 4, 8):
        for clips in ((1.0,), mse_clips(QuantSpec(2, estimator=RangeEstimator.MSE).grid)):
            assert ValueStats.best_of_all(stats, bits, clips) == [s.best(bits, clips) for s in stats]
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    counts[0] = counts[-1] = 1
    tiny = ValueStats.of_counts(0.0, 1e-310, 2, 1e-310 / (1 << 16), counts, 2)  # a range whose scale overflows
    with pytest.raises(EncodeError, match="cannot be quantized"):
        tiny.best(8)
    with pytest.raises(EncodeError, match="cannot be quantized"):
        ValueStats.best_of_all([stats[0], tiny], 8)
