"""The min-max quantizer against the paper's formula, by hand and against its code."""

from __future__ import annotations

import pytest
import torch

from tvq.errors import ConfigError
from tvq.quant.affine import fake_quantize, minmax_dequantize, minmax_params, minmax_quantize
from tvq.quant.bits import check_bits

from paper_reference import asymmetric_quantization, dequantize


def test_hand_computed_two_bit_example():
    x = torch.tensor([-1.0, -0.2, 0.1, 0.5])
    p = minmax_params(x, 2)
    # scale = 3 / (0.5 - (-1)) = 2; zero_point = -round(2 * -1) = 2
    assert p.scale == pytest.approx(2.0) and p.zero_point == 2.0
    codes = minmax_quantize(x, p)
    # round(2x + 2): 0, 1.6->2, 2.2->2, 3
    assert codes.tolist() == [0, 2, 2, 3]
    assert minmax_dequantize(codes, p, (4,)).tolist() == [-1.0, 0.0, 0.0, 0.5]


def test_round_half_to_even():
    # scale = 1 (range 0..255 over 255 steps), values exactly on .5 go to the even integer
    x = torch.tensor([0.0, 0.5, 1.5, 2.5, 255.0])
    codes = minmax_quantize(x, minmax_params(x, 8))
    assert codes.tolist() == [0, 0, 2, 2, 255]


def test_zero_point_rounding_clips_one_side_at_two_bits():
    # Symmetric data: s = 1.5, s*m = -1.5 rounds (to even) to -2, so z = 2: the grid is
    # {-4/3, -2/3, 0, 2/3} and the top value 1.0 is clipped to 2/3.
    x = torch.tensor([-1.0, 0.0, 1.0])
    p = minmax_params(x, 2)
    assert p.zero_point == 2.0
    assert fake_quantize(x, 2).tolist() == pytest.approx([-4 / 3, 0.0, 2 / 3])


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("seed", range(4))
def test_bit_identical_to_reference_code(bits: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(257, 31, generator=g) * 10 ** torch.empty(1).uniform_(-4, 1, generator=g)
    q_ref, s_ref, z_ref = asymmetric_quantization(x, bits)
    p = minmax_params(x, bits)
    codes = minmax_quantize(x, p)
    assert torch.equal(codes, q_ref.reshape(-1))
    assert torch.equal(minmax_dequantize(codes, p, tuple(x.shape)), dequantize(q_ref, s_ref, z_ref))


def test_codes_in_range_and_error_bound():
    x = torch.randn(10_000)
    for bits in range(1, 9):
        p = minmax_params(x, bits)
        codes = minmax_quantize(x, p)
        assert int(codes.max()) <= 2**bits - 1
        step = 1 / p.scale
        # rounding error <= step/2, plus up to step/2 of clipping from the rounded zero point
        assert float((fake_quantize(x, bits) - x).abs().max()) <= step * 1.0001


def test_constant_tensor_gives_exact_values_not_nan():
    for value in (0.0, 0.25, -3.0):
        x = torch.full((7, 3), value)
        out = fake_quantize(x, 3)
        assert not torch.isnan(out).any()
        assert torch.equal(out, x)
    # the paper's own code gives NaN here: tvq deliberately does not
    q, s, z = asymmetric_quantization(torch.zeros(4), 2)
    assert torch.isnan(dequantize(q, s, z)).all() or torch.isinf(s)


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, True])
def test_bits_out_of_range(bad):
    with pytest.raises(ConfigError, match="out of range"):
        check_bits(bad)
