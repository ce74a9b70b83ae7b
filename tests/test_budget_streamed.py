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
    def whole(theta, pre_t):
        return ValueStats.of(theta.float() - pre_t.float() if pre_t is not None else theta.float())

    monkeypatch.setattr(budget, "_streamed_stats", whole)
    assert _table(budget.analyse(pre, fts, options.validated(), progress=False)) == streamed


def test_the_streamed_analysis_names_the_bad_input(family, tmp_path):
    pre, fts = family
    from safetensors.torch import load_file

    bad = load_file(fts["t1"])
    bad["big.weight"][1000, 3] = float("inf")
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        budget.analyse(pre, {**fts, "t1": tmp_path / "bad.safetensors"}, QuantizeOptions(bits=2).validated(), progress=False, threads=2)
