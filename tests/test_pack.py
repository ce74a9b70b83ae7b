"""FQ / TVQ / RTVQ packs: algebra against the paper's code, laziness, size on disk."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import tvq.pack.reader as pack_reader
from paper_reference import paper_fq, paper_rtvq, paper_tvq
from tvq import QuantizeOptions, TaskVector, open_pack, quantize
from tvq.quant.selection import KeyRule
from tvq.report import pack_summary

FLOAT = lambda sd: {k: v for k, v in sd.items() if v.is_floating_point()}  # noqa: E731


def _assert_same(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for k in expected:
        if torch.isnan(expected[k]).all():
            # max == min: the paper's code divides by zero; tvq returns the exact constant
            assert torch.equal(actual[k], torch.zeros_like(actual[k])), k
            continue
        assert torch.equal(actual[k], expected[k]), k


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_tvq_matches_paper_bit_for_bit(tiny, bits):
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "p", QuantizeOptions(bits=bits, key_rule=KeyRule.PAPER), progress=False)
    pack = open_pack(tiny["dir"] / "p")
    for name, ft in tiny["fts"].items():
        expected = paper_tvq(FLOAT(tiny["pre"]), FLOAT(ft), bits)
        _assert_same(pack.task_vector(name).materialize(), expected)


def test_fq_matches_paper_bit_for_bit(tiny):
    opts = QuantizeOptions(target="finetuned", bits=4, key_rule=KeyRule.PAPER)
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "p", opts, progress=False)
    pack = open_pack(tiny["dir"] / "p", tiny["pre_path"])
    for name, ft in tiny["fts"].items():
        expected = paper_fq(FLOAT(tiny["pre"]), FLOAT(ft), 4)
        _assert_same(pack.task_vector(name).materialize(), expected)


@pytest.mark.parametrize("ec", [False, True])
def test_rtvq_matches_paper_bit_for_bit(tiny, ec):
    opts = QuantizeOptions(bits=2, residual=True, base_bits=3, error_correction=ec, key_rule=KeyRule.PAPER)
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "p", opts, progress=False)
    pack = open_pack(tiny["dir"] / "p")
    names = list(tiny["fts"])
    expected = paper_rtvq(FLOAT(tiny["pre"]), [FLOAT(tiny["fts"][n]) for n in names], 3, 2, ec)
    for name, exp in zip(names, expected):
        actual = pack.task_vector(name).materialize()
        for k in exp:
            if "word_embeddings" in k:
                # frozen by every task: tvq's base is exactly 0 where the paper's is the
                # fp32 rounding noise of (x+x+x)/3 - x
                assert torch.equal(actual[k], torch.zeros_like(actual[k]))
                continue
            if k in pack.manifest.files["base.safetensors"].tensors:
                assert torch.equal(actual[k], exp[k]), k
            else:  # kept tensors: tvq stores τ exactly, the paper base + offset (fp32 rounding apart)
                assert torch.allclose(actual[k], exp[k], atol=1e-7), k


def test_rtvq_error_correction_algebra(tiny):
    """EC offsets are measured against θ_pre + deq(Q(β)), which lowers the error."""
    errs = {}
    for ec in (False, True):
        out = tiny["dir"] / f"p{ec}"
        quantize(tiny["pre_path"], tiny["ft_paths"], out, QuantizeOptions(bits=2, residual=True, base_bits=2, error_correction=ec), progress=False)
        pack = open_pack(out)
        key = "encoder.layer.1.mlp.weight"
        pre, fts = tiny["pre"], tiny["fts"]
        avg = sum(fts[n][key] for n in fts) / len(fts)
        beta_hat = pack.base_tensor(key)
        ref = pre[key] + beta_hat if ec else avg
        for n in fts:
            offset_hat = pack.task_tensor(n, key) - beta_hat
            # the stored offset is a 2-bit quantization of θ_t - ref: within one step of it
            off = fts[n][key] - ref
            step = (off.max() - off.min()) / 3
            assert float((offset_hat - off).abs().max()) <= float(step) * 1.0001
        errs[ec] = sum(t.rel_error for t in pack.manifest.tasks)
    assert errs[True] < errs[False]


def test_average_output_is_mean_of_finetuned(tiny):
    avg_path = tiny["dir"] / "avg.safetensors"
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "p", QuantizeOptions(bits=4, residual=True), average_out=avg_path, progress=False)
    avg = load_file(avg_path)
    fts = list(tiny["fts"].values())
    for k, v in tiny["pre"].items():
        if v.is_floating_point():
            assert torch.allclose(avg[k], sum(f[k] for f in fts) / 3, atol=1e-7)
        else:
            assert torch.equal(avg[k], v)


def test_kept_tensors_exact_and_nonfloat_skipped(tiny):
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "p", QuantizeOptions(bits=2), progress=False)
    pack = open_pack(tiny["dir"] / "p")
    assert "embeddings.position_ids" not in pack.keys
    assert pack.manifest.skipped == ["embeddings.position_ids"]
    tv = TaskVector.from_checkpoints(tiny["pre_path"], tiny["ft_paths"]["task1"])
    k = "encoder.layer.0.attn.bias"  # 1-D: kept exactly
    assert torch.equal(pack.task_tensor("task1", k), tv[k])
    frozen = "embeddings.word_embeddings.weight"  # untouched 2-D tensor: exact zeros, no codes
    assert torch.equal(pack.task_tensor("task1", frozen), torch.zeros(50, 12))
    assert pack.entry("task1", frozen).kind == "const"


def test_single_tensor_read_touches_only_that_tensor(tiny, monkeypatch):
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "p", QuantizeOptions(bits=3, residual=True, base_bits=4), progress=False)
    reads: list[tuple[str, str]] = []

    class Spy(pack_reader.SafetensorsFile):
        def get_tensor(self, key):
            reads.append((self.path.name, key))
            return super().get_tensor(key)

    monkeypatch.setattr(pack_reader, "SafetensorsFile", Spy)
    pack = open_pack(tiny["dir"] / "p")
    pack.task_tensor("task2", "encoder.layer.2.mlp.weight")
    assert sorted(reads) == [("002-task2.safetensors", "encoder.layer.2.mlp.weight"), ("base.safetensors", "encoder.layer.2.mlp.weight")]


@pytest.mark.parametrize("bits", range(1, 9))
def test_size_on_disk_within_one_percent_of_theoretical(tmp_path, bits):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(bits)
    pre = {f"l{i}.weight": torch.randn(256, 257, generator=g) for i in range(6)} | {f"l{i}.bias": torch.randn(256, generator=g) for i in range(6)}
    save_file(pre, tmp_path / "pre.safetensors")
    fts = {}
    for t in range(2):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}, tmp_path / f"f{t}.safetensors")
        fts[f"t{t}"] = tmp_path / f"f{t}.safetensors"
    quantize(tmp_path / "pre.safetensors", fts, tmp_path / "p", QuantizeOptions(bits=bits), progress=False)
    s = pack_summary(tmp_path / "p")
    codes = 2 * 6 * ((256 * 257 * bits + 7) // 8)
    kept = 2 * 6 * 256 * 4
    assert s["theoretical_bytes"] == codes + kept
    assert s["total_bytes"] <= s["theoretical_bytes"] * 1.01 + 64 * 1024
    # and the real compression against the FP32 checkpoints (biases stay fp32)
    assert s["total_fp32_bytes"] / s["theoretical_bytes"] > 32 / bits * 0.85


def test_manifest_records_method_inputs_and_checksums(tiny):
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "p", QuantizeOptions(bits=2, residual=True, base_bits=3, error_correction=True), progress=False)
    m = json.loads((tiny["dir"] / "p" / "manifest.json").read_text())
    assert m["format"] == "tvq-pack" and m["version"] == 1
    assert m["method"] == {
        "target": "task_vector", "residual": True, "bits": 2, "base_bits": 3, "error_correction": True,
        "quantizer": "minmax", "group_size": None, "key_rule": "ndim", "budget_bits": None,
    }
    content_hash = re.compile(r"blake3:[0-9a-f]{64}")
    assert content_hash.fullmatch(m["pretrained"]["digest"]) and all(content_hash.fullmatch(t["source"]["digest"]) for t in m["tasks"])
    assert len({t["source"]["digest"] for t in m["tasks"]}) == 3
    for f in m["files"].values():
        assert len(f["sha256"]) == 64
