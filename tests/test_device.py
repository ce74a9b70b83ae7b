"""``--device``: parsing, refusal without CUDA, and the device code paths run on the host.

CI has no GPU. The paths that move work to a device (``tvq.encode.key``'s inputs moved and
chunked by ``DEVICE_CHUNK``, ``tvq.merge.blocks``'s stack built and merged there) are run here
on the CPU by telling them the CPU is a device: the same bytes must come out as the host path
gives. benchmarks/device.py checks the same on a real GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tvq.encode.key as key_module
import tvq.merge.blocks as blocks_module
import tvq.merge.engine as engine_module
import tvq.merge.methods.ties as ties_module
from tvq import QuantizeOptions, quantize
from tvq.cli import app
from tvq.device import CPU, divide_, divisor_for, parse_device
from tvq.errors import ConfigError
from tvq.io.safetensors_writer import sha256_file
from tvq.merge import load_task_vectors, merge
from tvq.merge.registry import available_methods, build_method

NO_CUDA = not torch.cuda.is_available()
SCHEMES = {
    "tvq4": QuantizeOptions(bits=4),
    "tvq2": QuantizeOptions(bits=2),
    "rtvq-b3o2-ec": QuantizeOptions(bits=2, residual=True, base_bits=3, error_correction=True),
    "rtvq-b3o2": QuantizeOptions(bits=2, residual=True, base_bits=3),
}
STATISTICS = ("rel_error", "rel_error_quantized")


def as_device(monkeypatch: pytest.MonkeyPatch, module: object) -> None:
    """Make ``module`` take its device path with the CPU as the device."""
    monkeypatch.setattr(module, "on_host", lambda device: False)


def test_parse_device_names_what_it_accepts() -> None:
    assert parse_device(None) == CPU
    assert parse_device("cpu") == CPU
    with pytest.raises(ConfigError, match="not a device"):
        parse_device("gpu0")
    with pytest.raises(ConfigError, match="cpu or cuda, not meta"):
        parse_device("meta")


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is present")
def test_cuda_without_a_device_is_one_line_and_exit_2(tiny: dict) -> None:
    with pytest.raises(ConfigError, match="sees no CUDA device; use --device cpu"):
        parse_device("cuda")
    out = tiny["dir"] / "pack"
    args = ["quantize", "--pretrained", str(tiny["pre_path"]), "--out", str(out), "--device", "cuda"]
    args += [a for name, p in tiny["ft_paths"].items() for a in ("--finetuned", f"{name}={p}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "sees no CUDA device" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_divisor_on_the_host_is_the_scalar_itself() -> None:
    t = torch.tensor([1.0, 2.0, 10.0])
    assert divisor_for(t, 3) == 3
    assert torch.equal(divide_(t.clone(), 3), t / 3)


def manifest_without_statistics(pack: Path) -> dict:
    m = json.loads((pack / "manifest.json").read_text())
    for task in m["tasks"]:
        for field in STATISTICS:
            task.pop(field, None)
    m.pop("digest")
    return m


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_quantize_device_path_writes_the_same_codes(tiny: dict, monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    """Three tasks (the RTVQ mean divides by 3): every pack file byte for byte, the manifest but
    for the error statistics (summed per larger chunk there), which agree to ~1e-5."""
    host, dev = tiny["dir"] / "host", tiny["dir"] / "dev"
    quantize(tiny["pre_path"], tiny["ft_paths"], host, SCHEMES[scheme], progress=False)
    as_device(monkeypatch, key_module)
    quantize(tiny["pre_path"], tiny["ft_paths"], dev, SCHEMES[scheme], progress=False, device="cpu")
    files = sorted(p.relative_to(host) for p in host.rglob("*.safetensors"))
    assert files and all(sha256_file(host / f) == sha256_file(dev / f) for f in files)
    assert manifest_without_statistics(host) == manifest_without_statistics(dev)
    for a, b in zip(*(json.loads((p / "manifest.json").read_text())["tasks"] for p in (host, dev)), strict=True):
        assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-4)


DEVICE_METHODS = sorted(name for name, cls in available_methods().items() if cls.on_device and build_method(name, {}, ["a", "b"]).runs_on_device())
# TIES beyond its defaults: the cut-offs and majority of each tensor from passes over the host's
# blocks (scope=tensor), weights (mergekit's election), keep_ties, and TIES as Consensus's base
TIES_VARIANTS: dict[str, dict] = {
    "ties:tensor": {"scope": "tensor"},
    "ties:weighted": {"scope": "tensor", "weight": {"task0": 1.0, "task1": 0.5, "task2": 2.0}, "density": {"task0": 0.2, "task1": 0.5, "task2": 0.9}},
    "ties:keep_ties": {"tie_rule": "keep_ties", "density": 0.5},
    "consensus:ties": {"base": "ties", "density": 0.3},
}


def test_methods_on_a_device_are_the_block_mergers_checked_on_one() -> None:
    assert {"task_arithmetic", "average", "consensus", "lines", "magmax", "dare", "ties"} <= set(DEVICE_METHODS)
    assert "dare_ties" not in DEVICE_METHODS  # TIES over DARE's dropped vectors merges each tensor whole
    assert build_method("consensus", {"base": "ties"}, ["a", "b"]).runs_on_device()
    assert build_method("consensus", {}, ["a", "b"]).runs_on_device()


@pytest.mark.parametrize("method", DEVICE_METHODS + list(TIES_VARIANTS))
@pytest.mark.parametrize("scheme", ["tvq4", "rtvq-b3o2-ec"])
def test_merge_device_path_writes_the_same_bytes(tiny: dict, monkeypatch: pytest.MonkeyPatch, method: str, scheme: str) -> None:
    """Every tensor above 8 elements merged on the 'device', in blocks of 64: the same file."""
    pack = tiny["dir"] / "pack"
    quantize(tiny["pre_path"], tiny["ft_paths"], pack, SCHEMES[scheme], progress=False)
    name, options = method.split(":")[0], TIES_VARIANTS.get(method, {})
    if options.get("scope") == "tensor":  # the host merges these tiny tensors whole; on the device they stream
        monkeypatch.setattr(ties_module, "whole_tensor_bytes", lambda: 0)
    outs = []
    kept: list[object] = []
    seen: list[int] = []
    voted: list[int] = []  # blocks of global TIES's majority pass stacked on the 'device'
    real = blocks_module.BlockMerge._merge_on_device
    monkeypatch.setattr(blocks_module.BlockMerge, "_merge_on_device", lambda self, *a: seen.append(a[2]) or real(self, *a))
    monkeypatch.setattr(ties_module, "device_stack", lambda *a: voted.append(a[2]) or blocks_module.device_stack(*a))
    for device_path in (False, True):
        if device_path:
            for module in (blocks_module, engine_module, ties_module):
                as_device(monkeypatch, module)
            monkeypatch.setattr(blocks_module, "DEVICE_MIN_ELEMENTS", 8)
            monkeypatch.setattr(blocks_module, "BLOCK_ELEMENTS", 64)
        _, vectors = load_task_vectors(tiny["pre_path"], packs=[pack])
        out = tiny["dir"] / f"merged-{device_path}.safetensors"
        kept.append(merge(name, tiny["pre_path"], vectors, out, options, device="cpu").kept)
        assert bool(seen) == device_path and (not seen or max(seen) > 64)  # several blocks of a tensor
        outs.append(sha256_file(out))
    assert kept[0] == kept[1]  # what the trim keeps, counted on either side
    global_ties = name == "ties" and options.get("scope", "global") == "global" or options.get("base") == "ties"
    assert bool(voted) == global_ties  # its majority pass ran on the 'device' too
    assert outs[0] == outs[1]


def test_ties_streams_on_a_device_where_its_host_rule_merges_whole() -> None:
    """Global TIES has no per-tensor pass: on a GPU every large tensor streams; per tensor, the
    host's rule (the working set of the whole tensor) still decides."""
    small = 1 << 20
    global_ties = build_method("ties", {}, ["a", "b"])
    per_tensor = build_method("ties", {"scope": "tensor"}, ["a", "b"])
    assert not global_ties.merges_by_blocks("w", small) and global_ties.streams_on_device("w", small)
    assert not per_tensor.streams_on_device("w", small)
    assert per_tensor.streams_on_device("w", 1 << 30) and per_tensor.merges_by_blocks("w", 1 << 30)
