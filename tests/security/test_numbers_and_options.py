"""Numbers from strangers: no silent NaN, strict inputs.

Finite checkpoints whose fp32 task vector overflows, fp64 values beyond fp32, parameters that
would decode to NaN/Inf, and option values that parse but mean nothing (NaN budgets, JSON
``true`` as a bit width, a NaN λ) are each one ``error:`` line naming the file, the tensor or
key and the problem, exit status 2, and nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tvq.encode.job import BASE, KeyJob
from tvq.encode.key import encode_key
from tvq.encode.options import QuantizeOptions
from tvq.encode.rtvq import encode_residual
from tvq.encode.tvq import encode_differences
from tvq.errors import EncodeError, TvqError
from tvq.quant.affine import params_from_range
from tvq.quant.chunks import sq_norm
from tvq.quant.schemes import SCHEMES, _group_encode, decode_problem
from tvq.quant.selection import TensorRole
from tvq.quant.stored import encode_quantized

from test_cli import assert_one_line_error, quantize_args, run

W = "encoder.layer.0.attn.weight"  # quantized (2-D)
B = "encoder.layer.0.attn.bias"  # kept (1-D): stored raw
BIG = 3e38


def _set(path: Path, key: str, index: tuple[int, ...], value: float, dtype: torch.dtype | None = None) -> None:
    """Rewrite one element of one tensor of a safetensors file (optionally the whole file's dtype)."""
    sd = load_file(path)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    sd[key][index] = value
    save_file(sd, path)


def _overflow(tiny: dict, key: str = W, task: str = "task1") -> None:
    """θ_pre = −3e38 and θ_task = +3e38 at one element: both finite, their fp32 difference is +Inf."""
    _set(tiny["pre_path"], key, (0,) * tiny["pre"][key].dim(), -BIG)
    _set(tiny["ft_paths"][task], key, (0,) * tiny["pre"][key].dim(), BIG)


def _nothing_written(tiny: dict, *outputs: Path) -> None:
    for out in outputs:
        assert not out.exists(), out
    leftovers = [p.name for p in tiny["dir"].iterdir() if p.name.startswith(".") or "tmp" in p.name]
    assert not leftovers, leftovers


# ---- no silent NaN: overflowing task vectors, through the CLI ---------------------------


@pytest.mark.parametrize(
    "extra",
    [
        [],  # TVQ, fused
        ["--residual"],  # RTVQ, fused (base and offsets)
        ["--residual", "--error-correction"],
        ["--target", "finetuned", "--bits", "8"],  # FQ
        ["--quantizer", "group", "--group-size", "16"],
        ["--quantizer", "mse"],
        ["--quantizer", "symmetric"],
        ["--quantizer", "ternary", "--bits", "2"],
        ["--quantizer", "sign", "--bits", "1"],
        ["--quantizer", "mse", "--residual"],  # the plain RTVQ path
        ["--budget-bits", "64"],  # the allocation's analysis pass (a tiny model: headers dominate)
    ],
    ids=lambda a: " ".join(a) or "tvq",
)
def test_overflowing_task_vector_is_one_line(tiny, extra):
    _overflow(tiny)
    out = tiny["dir"] / "pack"
    r = run(*quantize_args(tiny, out, *extra))
    assert_one_line_error(r, "task1.safetensors", W, "task vector overflows float32")
    _nothing_written(tiny, out)


@pytest.mark.parametrize("extra", [[], ["--residual"], ["--residual", "--error-correction"]])
def test_overflow_with_the_averaged_model(tiny, extra):
    _overflow(tiny)
    out, avg = tiny["dir"] / "pack", tiny["dir"] / "avg.safetensors"
    r = run(*quantize_args(tiny, out, "--average-out", avg, *extra))
    assert_one_line_error(r, "task1.safetensors", W, "task vector overflows float32")
    _nothing_written(tiny, out, avg)


def test_overflowing_kept_tensor(tiny):
    """A bias is stored raw (τ itself): its overflow is found by |τ|², computed anyway."""
    _overflow(tiny, B, "task2")
    out = tiny["dir"] / "pack"
    assert_one_line_error(run(*quantize_args(tiny, out)), "task2.safetensors", B, "task vector overflows float32")
    _nothing_written(tiny, out)


@pytest.mark.parametrize("extra", [[], ["--residual"]])
def test_average_that_overflows(tiny, extra):
    """Every θ_t at 3e38: each τ_t is finite, but fp32's sum of the θ_t (the paper's mean) is not."""
    for p in tiny["ft_paths"].values():
        _set(p, W, (0, 0), BIG)
    out, avg = tiny["dir"] / "pack", tiny["dir"] / "avg.safetensors"
    r = run(*quantize_args(tiny, out, "--average-out", avg, *extra))
    assert_one_line_error(r, "task0.safetensors", W, "average of the fine-tuned checkpoints overflows float32")
    _nothing_written(tiny, out, avg)


def test_fused_rtvq_base_that_overflows(tiny):
    for p in tiny["ft_paths"].values():
        _set(p, W, (0, 0), BIG)
    out = tiny["dir"] / "pack"
    r = run(*quantize_args(tiny, out, "--residual"))
    assert_one_line_error(r, W, "average of the fine-tuned checkpoints overflows float32")
    _nothing_written(tiny, out)


def test_range_that_overflows(tiny):
    """τ is finite (±2.5e38) but max − min is not: min-max cannot quantize it (the paper's
    code would store scale 0); symmetric can, and does."""
    _set(tiny["ft_paths"]["task0"], W, (0, 0), 2.5e38)
    _set(tiny["ft_paths"]["task0"], W, (0, 1), -2.5e38)
    out = tiny["dir"] / "pack"
    assert_one_line_error(run(*quantize_args(tiny, out)), "task0.safetensors", W, "cannot quantize the task vector", "range")
    _nothing_written(tiny, out)
    r = run(*quantize_args(tiny, out, "--quantizer", "symmetric"))
    assert r.exit_code == 0, r.output


def test_range_too_narrow_for_fp32(tiny):
    """A task vector of 0 and one subnormal: 255 / 1e-45 is +Inf in fp32 (zero point NaN)."""
    for name, p in tiny["ft_paths"].items():
        sd = {k: v.clone() for k, v in tiny["pre"].items()}
        if name == "task0":
            sd[W] = torch.zeros_like(sd[W])
            sd[W][0, 0] = 1e-45
        save_file(sd, p)
    pre = dict(tiny["pre"])
    pre[W] = torch.zeros_like(pre[W])
    save_file(pre, tiny["pre_path"])
    out = tiny["dir"] / "pack"
    r = run(*quantize_args(tiny, out, "--bits", "8"))
    assert_one_line_error(r, "task0.safetensors", W, "cannot be quantized in float32 at 8 bits")
    _nothing_written(tiny, out)


@pytest.mark.parametrize("extra", [[], ["--residual"], ["--quantizer", "mse"]])
def test_fp64_inputs(tiny, extra):
    """fp64 checkpoints: finite values beyond fp32's range, or an fp32 overflow of the difference."""
    for p in [tiny["pre_path"], *tiny["ft_paths"].values()]:
        save_file({k: v.double() if v.is_floating_point() else v for k, v in load_file(p).items()}, p)
    _set(tiny["ft_paths"]["task2"], W, (1, 1), 1e300)
    out = tiny["dir"] / "pack"
    assert_one_line_error(run(*quantize_args(tiny, out, *extra)), "task2.safetensors", W, "beyond the float32 range")
    _set(tiny["ft_paths"]["task2"], W, (1, 1), float("nan"))
    assert_one_line_error(run(*quantize_args(tiny, out, *extra)), "task2.safetensors", W, "contains NaN or Inf")
    _set(tiny["ft_paths"]["task2"], W, (1, 1), 0.0)
    _overflow(tiny)
    assert_one_line_error(run(*quantize_args(tiny, out, *extra)), "task1.safetensors", W, "task vector overflows float32")
    _set(tiny["pre_path"], W, (0, 0), 0.0)
    _set(tiny["ft_paths"]["task1"], W, (0, 0), 0.0)
    _overflow(tiny, B)  # a kept tensor: τ is stored raw, in fp64, and would not fit fp32
    assert_one_line_error(run(*quantize_args(tiny, out, *extra)), "task1.safetensors", B, "task vector overflows float32")
    _nothing_written(tiny, out)


def test_huge_but_finite_task_vectors_still_quantize(tiny):
    """|τ| ~ 1e30: fp32 dot products of |τ|² overflow, the statistics are redone in fp64 and
    the pack (whose rel_error must be finite to be read back) is written and readable."""
    for p in tiny["ft_paths"].values():
        _set(p, W, (0, 0), 1e30)
    out = tiny["dir"] / "pack"
    r = run(*quantize_args(tiny, out))
    assert r.exit_code == 0, r.output
    info = json.loads(run("info", out, "--json").output)
    assert all(0 <= t["rel_error"] < 1 for t in info["tasks"])


# ---- no silent NaN: the encoders themselves ----------------------------------------------


def test_fused_encoder_finds_the_overflow_in_its_range_pass():
    pre = torch.tensor([-BIG, 0.0, 1.0, 2.0])
    fine = torch.tensor([0.0, 0.5, 1.5, 2.5])
    bad = torch.tensor([BIG, 0.5, 1.5, 2.5])
    with pytest.raises(EncodeError) as exc:
        encode_differences([fine, bad], pre, 4, chunk=8)
    assert exc.value.task == 1 and "not finite" in exc.value.problem
    with pytest.raises(EncodeError) as exc:
        encode_residual([bad, bad], pre, 4, 5, error_correction=True, chunk=8)
    assert exc.value.base


def test_fused_encoder_refuses_a_range_fp32_cannot_scale():
    pre = torch.zeros(16)
    wide = torch.zeros(16)
    wide[0], wide[1] = BIG, -BIG
    with pytest.raises(EncodeError, match="cannot be quantized"):
        encode_differences([wide], pre, 4, chunk=8)


@pytest.mark.parametrize("scheme,bits", [("minmax", 4), ("mse", 4), ("group", 4), ("symmetric", 4), ("ternary", 2), ("sign", 1)])
def test_plain_encoders_refuse_non_finite_values(scheme, bits):
    x = torch.tensor([[1.0, float("inf")], [0.0, -2.0]])
    opts = {"group_size": 2} if scheme == "group" else {}
    with pytest.raises(EncodeError):
        encode_quantized(x, bits, scheme, **opts)
    with pytest.raises(EncodeError):
        encode_quantized(torch.tensor([[float("nan"), 1.0], [0.0, 2.0]]), bits, scheme, **opts)


def test_params_from_range_is_finite_or_an_error():
    assert params_from_range(torch.tensor(-1.0), torch.tensor(1.0), 4).scale == pytest.approx(7.5)
    assert params_from_range(torch.tensor(2.0), torch.tensor(2.0), 4).constant == 2.0
    for lo, hi in [(-BIG, BIG), (0.0, 1e-45), (0.0, float("inf")), (float("nan"), 1.0)]:
        with pytest.raises(EncodeError):
            params_from_range(torch.tensor(lo), torch.tensor(hi), 8)


def test_decode_problem_checks_every_parameter():
    assert decode_problem("minmax", 4, {"scale": 7.5, "zero_point": 8.0}, {}) is None
    assert "not positive" in decode_problem("minmax", 4, {"scale": 0.0, "zero_point": 0.0}, {})
    assert "'zero_point' is nan" in decode_problem("minmax", 4, {"scale": 1.0, "zero_point": float("nan")}, {})
    assert "beyond float32" in decode_problem("minmax", 8, {"scale": 1e-37, "zero_point": 0.0}, {})
    assert decode_problem("sign", 1, {"alpha": 3.4e38}, {}) is None
    assert "'alpha' is inf" in decode_problem("ternary", 2, {"alpha": float("inf"), "threshold": 0.0}, {})
    assert "not positive" in decode_problem("symmetric", 4, {"step": -1.0, "offset": 7.0}, {})
    lo, step = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3e38])
    assert "beyond float32" in decode_problem("group", 4, {"group_size": 8}, {"lo": lo, "step": step})
    assert "negative" in decode_problem("group", 4, {"group_size": 8}, {"lo": lo, "step": -step})


def test_sq_norm_is_finite_for_every_finite_vector():
    x = torch.full((1000,), 3e38)
    assert sq_norm(x) == pytest.approx(1000 * 3e38**2, rel=1e-6)
    assert sq_norm(torch.tensor([1.0, 2.0])) == 5.0
    assert sq_norm(torch.tensor([float("inf")])) == float("inf")


def _old_groups(flat: torch.Tensor, group_size: int) -> torch.Tensor:
    """Today's padding, before the cap: the reference for a group larger than the tensor."""
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


@pytest.mark.parametrize("group_size", [50, 51, 64, 1000])
def test_group_larger_than_the_tensor_is_one_group_bit_identical(group_size):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 10, generator=g)
    new = _group_encode(x, 3, {"group_size": group_size})
    padded = _old_groups(x.reshape(-1), group_size)
    lo = padded.min(dim=1).values
    step = (padded.max(dim=1).values - lo) / 7
    codes = torch.clamp(torch.round((padded - lo[:, None]) / step[:, None]), 0, 7).to(torch.uint8).reshape(-1)[:50]
    assert torch.equal(new.codes, codes)
    assert torch.equal(new.aux["lo"], lo) and torch.equal(new.aux["step"], step)
    assert new.params == {"group_size": group_size}  # recorded as given: the manifest is unchanged
    decoded = SCHEMES["group"].decode(new.codes, 3, new.params, new.aux)
    assert torch.equal(decoded, SCHEMES["group"].decode(new.codes, 3, {"group_size": 50}, new.aux))


def test_absurd_group_size_allocates_nothing_big():
    x = torch.randn(4, 4)
    enc = _group_encode(x, 4, {"group_size": 10**12})  # would be 4 TB of padding before the cap
    assert enc.aux["lo"].numel() == 1
    assert SCHEMES["group"].decode(enc.codes, 4, enc.params, enc.aux).numel() == 16


# ---- the property: every finite input encodes to something finite, or is an error ----------


class _Memory:
    """A checkpoint reader over a dict (what encode_key needs: get and path)."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: str) -> None:
        self.tensors, self.path = tensors, Path(path)

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


_values = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),  # huge magnitudes and subnormals
    st.floats(-1.0, 1.0, width=32),
    st.sampled_from([0.0, 3.4028234663852886e38, -3.4028234663852886e38, 1e-45, 1.7e38]),
)
_configs = st.sampled_from(  # scheme, bits, RTVQ base bits (None: TVQ/FQ), error correction, target
    [
        ("minmax", 4, None, False, "task_vector"),
        ("minmax", 1, None, False, "task_vector"),
        ("minmax", 3, 4, False, "task_vector"),
        ("minmax", 3, 4, True, "task_vector"),
        ("minmax", 8, None, False, "finetuned"),
        ("mse", 4, None, False, "task_vector"),
        ("mse", 2, 3, True, "task_vector"),
        ("group", 4, None, False, "task_vector"),
        ("group", 2, 3, False, "task_vector"),
        ("symmetric", 4, None, False, "task_vector"),
        ("ternary", 2, None, False, "task_vector"),
        ("sign", 1, None, False, "task_vector"),
        ("sign", 1, 1, True, "task_vector"),
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), config=_configs, n=st.integers(2, 24), tasks=st.integers(1, 3))
def test_finite_inputs_encode_finite_or_raise(data, config, n, tasks):
    scheme, bits, base_bits, ec, target = config
    arrays = st.lists(_values, min_size=n, max_size=n)
    pre = torch.tensor(data.draw(arrays), dtype=torch.float32).reshape(1, n)
    fts = {f"t{i}": torch.tensor(data.draw(arrays), dtype=torch.float32).reshape(1, n) for i in range(tasks)}
    options = QuantizeOptions(target=target, bits=bits, residual=base_bits is not None, base_bits=base_bits, error_correction=ec,
                              quantizer=scheme, group_size=4)  # fmt: skip
    job = KeyJob("w", TensorRole.QUANTIZE, _Memory({"w": pre}, "pre"), {k: _Memory({"w": v}, k) for k, v in fts.items()},
                 options.validated())  # fmt: skip
    try:
        result = encode_key(job)
    except TvqError as exc:
        assert "\n" not in str(exc) and "'w'" in str(exc)
        return
    base = result.stored[BASE].decoded() if BASE in result.stored else 0.0
    for name, stored in result.stored.items():
        assert bool(torch.isfinite(stored.decoded()).all()), (name, stored)
        if name != BASE:
            assert bool(torch.isfinite(stored.decoded() + base).all()), name  # τ̂ = β̂ + ô for RTVQ


# ---- strict inputs: options and configs ---------------------------------------------------


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--budget-bits", "nan"], ["--budget-bits nan", "positive finite"]),
        (["--budget-bits", "inf"], ["--budget-bits inf", "positive finite"]),
        (["--budget-bits", "-1"], ["--budget-bits -1.0", "positive finite"]),
        (["--budget-bits", "0"], ["--budget-bits 0.0", "positive finite"]),
        (["--budget-bytes", "0"], ["--budget-bytes 0", "positive whole number"]),
        (["--budget-bytes", "-5"], ["--budget-bytes -5", "positive whole number"]),
        (["--budget-bits", "3", "--budget-bytes", "100"], ["exactly one of --budget-bits or --budget-bytes"]),
        (["--quantizer", "group", "--group-size", str(10**12)], ["group_size=1000000000000", "the most a pack may record"]),
        (["--quantizer", "group", "--group-size", "1"], ["group_size=1", "from 2 to"]),
        (["--bits", "0"], ["bits=0", "out of range"]),
        (["--bits", "9"], ["bits=9", "out of range"]),
    ],
)
def test_bad_quantize_numbers(tiny, extra, fragments):
    out = tiny["dir"] / "pack"
    assert_one_line_error(run(*quantize_args(tiny, out, *extra)), *fragments)
    _nothing_written(tiny, out)


@pytest.mark.parametrize("extra", [["--bits", "1e3"], ["--bits", "4.5"], ["--threads", "0"], ["--group-size", "big"], ["--budget-bits", "lots"]])
def test_typer_refuses_unparsable_numbers_without_a_traceback(tiny, extra):
    out = tiny["dir"] / "pack"
    r = run(*quantize_args(tiny, out, *extra))
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "Invalid value" in r.output
    _nothing_written(tiny, out)


@pytest.mark.parametrize(
    "body,shown",
    [
        ('{"encoder.layer.0.attn.weight": NaN}', "NaN"),
        ('{"encoder.layer.0.attn.weight": Infinity}', "Infinity"),
        ('{"encoder.layer.0.attn.weight": -1}', "-1"),
        ('{"encoder.layer.0.attn.weight": true}', "true"),
        ('{"encoder.layer.0.attn.weight": "high"}', '"high"'),
    ],
)
def test_bad_sensitivity_weights(tiny, body, shown):
    sens = tiny["dir"] / "sens.json"
    sens.write_text(body)
    out = tiny["dir"] / "pack"
    r = run(*quantize_args(tiny, out, "--budget-bits", "3", "--sensitivity", sens))
    assert_one_line_error(r, "sens.json", W, "sensitivity must be a finite non-negative number", f"not {shown}")
    _nothing_written(tiny, out)


def test_sensitivity_library_entry_point_is_checked_too(tiny):
    from tvq.encode.budget import analyse

    with pytest.raises(TvqError, match="finite non-negative"):
        analyse(tiny["pre_path"], tiny["ft_paths"], QuantizeOptions(), sensitivity={W: float("nan")}, progress=False)


@pytest.mark.parametrize(
    "body,fragments",
    [
        ('{"quantize_task_bit": true}', ["'quantize_task_bit'", "valid integer", "got true"]),
        ('{"quantize_task_bit": 4.5}', ["'quantize_task_bit'", "valid integer", "got 4.5"]),
        ('{"quantize_task_bit": "4"}', ["'quantize_task_bit'", "valid integer", 'got "4"']),
        ('{"quantize_task_bit": 99}', ["'quantize_task_bit'", "less than or equal to 8"]),
        ('{"quantize_base_bit": NaN}', ["'quantize_base_bit'", "got NaN"]),
        ('{"quantize_residual": "yes"}', ["'quantize_residual'", "valid boolean", 'got "yes"']),
        ('{"q_error_correction": 1}', ["'q_error_correction'", "valid boolean", "got 1"]),
        ('{"quantize_task_bit": 4, "quantize_task_bit": 2}', ["key 'quantize_task_bit' appears twice"]),
    ],
)
def test_strict_quantize_config(tiny, body, fragments):
    cfg = tiny["dir"] / "quantize_config.json"
    cfg.write_text(body)
    out = tiny["dir"] / "pack"
    assert_one_line_error(run(*quantize_args(tiny, out, "--config", cfg)), "quantize_config.json", *fragments)
    _nothing_written(tiny, out)


def test_integral_float_bits_is_that_integer(tiny):
    """Decision: JSON has one number type, so 4.0 is the integer 4 (the same pack); 4.5 is not."""
    cfg = tiny["dir"] / "quantize_config.json"
    packs = []
    for bits in ("4.0", "4"):
        cfg.write_text(f'{{"quantize_task_bit": {bits}}}')
        out = tiny["dir"] / f"pack{len(packs)}"
        assert run(*quantize_args(tiny, out, "--config", cfg)).exit_code == 0
        packs.append(sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*.safetensors")))
    assert packs[0] == packs[1]


def test_strict_load_config(tiny):
    cfg = tiny["dir"] / "load_config.json"
    cfg.write_text('{"load_tv_type": "quantized_task_vector", "load_task_bits": true}')
    out = tiny["dir"] / "merged.safetensors"
    fts = [a for n, p in tiny["ft_paths"].items() for a in ("-f", f"{n}={p}")]
    r = run("merge", "--method", "task_arithmetic", "-p", tiny["pre_path"], *fts, "--load-config", cfg, "--out", out, "--no-progress")
    assert_one_line_error(r, "load_config.json", "'load_task_bits'", "valid integer", "got true")
    assert not out.exists()


def _merge(tiny, out, *extra):
    fts = [a for n, p in tiny["ft_paths"].items() for a in ("-f", f"{n}={p}")]
    return run("merge", "-p", tiny["pre_path"], *fts, "--out", out, "--no-progress", *extra)


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--method", "task_arithmetic", "--lambda", ".nan"], ["'lambda'", "finite number"]),
        (["--method", "task_arithmetic", "--lambda=-.inf"], ["'lambda'", "finite number"]),
        (["--method", "task_arithmetic", "--lambda", "nan"], ["'lambda'", "valid number", 'got "nan"']),
        (["--method", "task_arithmetic", "--lambda", "true"], ["'lambda'", "valid number", "got true"]),
        (["--method", "ties", "--density", ".nan"], ["'density'", "finite number"]),
        (["--method", "ties", "--density", "1.5"], ["'density'", "less than or equal to 1"]),
        (["--method", "ties", "--density", "-0.1"], ["'density'", "greater than or equal to 0"]),
        (["--method", "dare", "--rescale", "yes_please"], ["'rescale'", "valid boolean"]),
        (["--method", "dare", "--rescale", "1"], ["'rescale'", "valid boolean", "got 1"]),
        (["--method", "dare", "--seed", "1.5"], ["'seed'", "valid integer", "got 1.5"]),
        (["--method", "dare", "--drop-rate", ".inf"], ["'drop_rate'", "finite number"]),
        (["--method", "consensus", "--mask-lambda", "{task0: .nan}"], ["'mask_lambda'"]),
        (["--method", "consensus", "--k", "true"], ["'k'", "valid integer"]),
        (["--method", "lines", "--beta", ".inf"], ["'beta'", "finite number"]),
        (["--method", "dare", "--density", "0.5"], ["invalid options", "only applies with base=ties"]),
    ],
)
def test_strict_merge_options(tiny, extra, fragments):
    out = tiny["dir"] / "merged.safetensors"
    assert_one_line_error(_merge(tiny, out, *extra), "merge method", *fragments)
    assert not out.exists()


def test_merge_options_that_are_numbers_in_any_spelling(tiny):
    """``1e-1`` is a number (YAML 1.1 would make it a string), ``7.0`` an integral seed."""
    a, b = tiny["dir"] / "a.safetensors", tiny["dir"] / "b.safetensors"
    assert _merge(tiny, a, "--method", "dare", "--lambda", "1e-1", "--seed", "7.0").exit_code == 0
    assert _merge(tiny, b, "--method", "dare", "--lambda", "0.1", "--seed", "7").exit_code == 0
    assert a.read_bytes() == b.read_bytes()


def test_merge_config_file_is_strict(tiny):
    cfg = tiny["dir"] / "merge.yaml"
    out = tiny["dir"] / "merged.safetensors"
    cfg.write_text(yaml.safe_dump({"method": "ties", "density": 0.2}) + "lambda: .inf\n")
    assert_one_line_error(_merge(tiny, out, "--config", cfg), "merge method 'ties'", "'lambda'", "finite number")
    cfg.write_text("method: ties\nlambda: 3e-1\n")
    r = _merge(tiny, out, "--config", cfg)
    assert r.exit_code == 0, r.output


def test_tvq_average_that_overflows(tiny):
    for p in tiny["ft_paths"].values():
        _set(p, W, (0, 0), BIG)
    out = tiny["dir"] / "avg.safetensors"
    r = run("average", "--out", out, "--no-progress", *(a for n, p in tiny["ft_paths"].items() for a in ("-f", f"{n}={p}")))
    assert_one_line_error(r, "task0.safetensors", W, "overflows float32")
    assert not out.exists()


@pytest.mark.parametrize(
    "extra", [["--method", "task_arithmetic", "--lambda", "1e10"], ["--method", "task_arithmetic", "--dtype", "float16", "--lambda", "1e8"]]
)
def test_merge_that_overflows_writes_nothing(tiny, extra):
    """Finite λ, finite inputs, and still a merged tensor beyond the output dtype: an error, not Inf."""
    _set(tiny["ft_paths"]["task0"], W, (0, 0), 1e30)
    out = tiny["dir"] / "merged.safetensors"
    assert_one_line_error(_merge(tiny, out, *extra), "merged tensor", "not finite")
    assert not out.exists()


def test_adamerging_coefficients_must_be_finite(tiny):
    from tvq.errors import ConfigError
    from tvq.merge.adamerging import FORMAT, AdaMergingResult

    path = tiny["dir"] / "coefficients.json"
    path.write_text(json.dumps({"format": FORMAT, "tasks": ["a", "b"], "coefficients": {"w": [0.3, float("nan")]}}))
    with pytest.raises(ConfigError, match="finite"):
        AdaMergingResult.load(path)
