"""The better low-bit quantizers: exact on hand examples, lossless through packs, and better."""

from __future__ import annotations

import pytest
import torch

from tvq import QuantizeOptions, open_pack, quantize
from tvq.errors import ConfigError
from tvq.quant.schemes import SCHEMES, fake_quantize_with, get_scheme

from conftest import laplace


def rel_err(x, y):
    return float((x - y).norm() / y.norm())


def test_symmetric_hand_example():
    x = torch.tensor([-1.0, -0.4, 0.0, 0.2, 0.6])
    # 3 bits: levels -3..3, step = 1/3
    assert fake_quantize_with(x, "symmetric", 3).tolist() == pytest.approx([-1.0, -1 / 3, 0.0, 1 / 3, 2 / 3])


def test_sign_hand_example():
    x = torch.tensor([-2.0, 1.0, 3.0, -1.0])
    # alpha = mean|x| = 1.75
    assert fake_quantize_with(x, "sign", 1).tolist() == [-1.75, 1.75, 1.75, -1.75]


def test_ternary_hand_example():
    x = torch.tensor([-1.0, -0.02, 0.01, 0.03, 1.0, 0.9])
    out = fake_quantize_with(x, "ternary", 2)
    # the small entries go to 0; the large ones share alpha = mean of their magnitudes
    assert out.tolist() == pytest.approx([-29 / 30, 0, 0, 0, 29 / 30, 29 / 30])


def test_group_hand_example():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 10.5, 11.0, 10.0])
    out = fake_quantize_with(x, "group", 2, group_size=4)
    # group 1: lo 0, step 1 -> exact; group 2: lo 10, step 1/3, 10.5 -> 1.5 steps -> 2 (half to even)
    assert out.tolist() == pytest.approx([0, 1, 2, 3, 10, 10 + 2 / 3, 11, 10], abs=1e-6)


@pytest.mark.parametrize("bits", [2, 3])
def test_better_quantizers_beat_minmax_on_heavy_tails(bits):
    x = laplace((256, 512), 1e-3, torch.Generator().manual_seed(0))  # task vectors are heavy-tailed
    base = rel_err(fake_quantize_with(x, "minmax", bits), x)
    assert rel_err(fake_quantize_with(x, "mse", bits), x) < base * 0.9
    assert rel_err(fake_quantize_with(x, "group", bits, group_size=64), x) < base * 0.9


def test_ternary_and_sign_beat_two_and_one_bit_minmax():
    x = laplace((256, 512), 1e-3, torch.Generator().manual_seed(1))
    assert rel_err(fake_quantize_with(x, "ternary", 2), x) < rel_err(fake_quantize_with(x, "minmax", 2), x)
    assert rel_err(fake_quantize_with(x, "sign", 1), x) < rel_err(fake_quantize_with(x, "minmax", 1), x)


@pytest.mark.parametrize("scheme,bits", [("mse", 3), ("group", 2), ("symmetric", 4), ("ternary", 2), ("sign", 1)])
@pytest.mark.parametrize("residual", [False, True])
def test_schemes_round_trip_through_packs(tiny, scheme, bits, residual):
    opts = QuantizeOptions(bits=bits, quantizer=scheme, group_size=32, residual=residual, base_bits=bits, error_correction=residual)
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "p", opts, progress=False)
    pack = open_pack(tiny["dir"] / "p")
    key = "encoder.layer.1.mlp.weight"
    if residual:
        beta = sum(tiny["fts"][n][key] for n in tiny["fts"]) / 3 - tiny["pre"][key]
        beta_hat = fake_quantize_with(beta, scheme, bits, group_size=32)
        assert torch.allclose(pack.base_tensor(key), beta_hat, atol=1e-7)
        off = tiny["fts"]["task1"][key] - (tiny["pre"][key] + beta_hat)
        expected = beta_hat + fake_quantize_with(off, scheme, bits, group_size=32)
    else:
        expected = fake_quantize_with(tiny["fts"]["task1"][key] - tiny["pre"][key], scheme, bits, group_size=32)
    assert torch.allclose(pack.task_tensor("task1", key), expected, atol=1e-7)
    assert scheme in pack.method.label


def test_unsupported_bits_for_scheme():
    with pytest.raises(ConfigError, match="ternary.*supports bits 2"):
        get_scheme("ternary", 3)
    with pytest.raises(ConfigError, match="unknown quantizer"):
        get_scheme("kmeans")
    assert set(SCHEMES) == {"minmax", "mse", "group", "symmetric", "ternary", "sign"}
