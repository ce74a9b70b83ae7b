"""Merging by blocks (tvq.merge.blocks) writes the bytes of the whole-tensor merge, from FP32
and bf16 checkpoints and from every pack kind, whatever the block size."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tvq.merge.blocks as blocks_module
import tvq.merge.methods.ties as ties_module
from tvq import QuantizeOptions, quantize
from tvq.errors import PackError
from tvq.merge import load_task_vectors, merge
from tvq.pack.reader import open_pack
from tvq.quant import entropy

from merge_helpers import spy_block_writes

WHOLE = 1 << 40  # a block larger than any tensor: every tensor merged whole (the old path)


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(160, 128, generator=g),  # 20480 elements: several zstd frames of 4 KiB at 4 bits
        "layers.0.weight": torch.randn(24, 20, generator=g) * 0.2,
        "layers.0.bias": torch.randn(20, generator=g) * 0.05,
        "layers.1.weight": torch.randn(24, 20, generator=g) * 0.2,
        "norm.weight": 1 + torch.randn(20, generator=g) * 0.01,
        "ids": torch.arange(6),
    }


def _finetuned(pre: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    out = {}
    for k, v in pre.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        noise = 0.02 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)  # peaked: entropy coding pays
        out[k] = v + noise
    return out


def write_inputs(root: Path, kinds: dict[str, dict]) -> dict:
    """A small model, 3 fine-tunes (fp32 and bf16) and a pack of each kind, with 4 KiB zstd
    frames so a tensor spans several: the inputs of the by-blocks tests."""
    pre = _model(0)
    save_file(pre, root / "pre.safetensors")
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in pre.items()}, root / "pre_bf16.safetensors")
    fts, fts_bf16 = {}, {}
    for i in range(3):
        ft = _finetuned(pre, i)
        fts[f"t{i}"] = root / f"t{i}.safetensors"
        save_file(ft, fts[f"t{i}"])
        fts_bf16[f"t{i}"] = root / f"t{i}_bf16.safetensors"
        save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in ft.items()}, fts_bf16[f"t{i}"])
    packs = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(entropy.encode, "__defaults__", (entropy.MIN_BLOCK, *(entropy.encode.__defaults__ or ())[1:]))  # 4 KiB frames: a tensor spans several
    try:
        for name, options in kinds.items():
            packs[name] = root / name
            quantize(root / "pre.safetensors", fts, packs[name], QuantizeOptions(**options), progress=False)
    finally:
        mp.undo()
    return {"root": root, "pre": root / "pre.safetensors", "pre_bf16": root / "pre_bf16.safetensors", "fts": fts,
            "fts_bf16": fts_bf16, "packs": packs}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    kinds = {
        "tvq4": {"bits": 4},
        "tvq4_plain": {"bits": 4, "entropy": "off"},
        "tvq2": {"bits": 2},
        "tvq3": {"bits": 3},
        "rtvq": {"bits": 2, "residual": True, "base_bits": 3, "error_correction": True},
        "rtvq_plain": {"bits": 2, "residual": True, "base_bits": 3, "entropy": "off"},
        "fq8": {"bits": 8, "target": "finetuned"},
        "group": {"bits": 4, "quantizer": "group", "group_size": 16},  # group-wise: merged whole
    }
    return write_inputs(tmp_path_factory.mktemp("blocks"), kinds)


def test_entropy_coded_packs_span_several_frames(inputs):
    for name in ("tvq4", "tvq2", "rtvq"):
        entry = open_pack(inputs["packs"][name]).entry("t0", "embed.weight")
        assert entry.entropy is not None and len(entry.entropy.blocks) >= 2, name


METHODS = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"lambda": 0.7, "weight": {"t0": 1.0, "t1": 0.5, "t2": 0.25}, "normalize": True}),
    ("average", {}),
]


def _merged_bytes(monkeypatch, block: int, method: str, options: dict, out, *, pre, packs=(), finetuned=None, dtype="same", task=None):
    pieces = spy_block_writes(monkeypatch, block)
    reader, vectors = load_task_vectors(pre, packs=list(packs), finetuned=finetuned)
    merge(method, reader, vectors, out, options, dtype=dtype, overwrite=True, task=task)
    return out.read_bytes(), pieces


def _sources(inputs):
    yield "fp32", {"pre": inputs["pre"], "finetuned": inputs["fts"]}
    yield "bf16", {"pre": inputs["pre_bf16"], "finetuned": inputs["fts_bf16"]}
    for name, path in inputs["packs"].items():
        yield name, {"pre": inputs["pre"], "packs": [path]}
    yield "mixed", {"pre": inputs["pre"], "packs": [inputs["packs"]["tvq4"]], "finetuned": {"x": inputs["fts"]["t1"]}}


@pytest.mark.parametrize(("method", "options"), METHODS, ids=["ta", "ta_weighted", "average"])
def test_block_merge_writes_the_whole_merge_bytes(inputs, tmp_path, monkeypatch, method, options):
    for name, source in _sources(inputs):
        opts = options if name != "mixed" or "weight" not in options else {**options, "weight": 0.5}
        reference, none = _merged_bytes(monkeypatch, WHOLE, method, opts, tmp_path / f"{name}_whole.safetensors", **source)
        assert none == []
        for block in (24, 1000):
            got, pieces = _merged_bytes(monkeypatch, block, method, opts, tmp_path / f"{name}_{block}.safetensors", **source)
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(reference).hexdigest(), (name, block)
            if name == "group":  # group-wise codes do not decode by blocks: merged whole, the same bytes
                assert pieces == []
            else:
                expected = {"embed.weight"} | ({"layers.0.weight", "layers.1.weight"} if block == 24 else set())
                assert set(pieces) == expected, (name, block)


def test_block_merge_casts_like_the_whole_merge(inputs, tmp_path, monkeypatch):
    for dtype in ("bfloat16", "float16"):
        source = {"pre": inputs["pre"], "packs": [inputs["packs"]["rtvq"]], "dtype": dtype}
        reference, _ = _merged_bytes(monkeypatch, WHOLE, "task_arithmetic", {}, tmp_path / "whole.safetensors", **source)
        got, pieces = _merged_bytes(monkeypatch, 72, "task_arithmetic", {}, tmp_path / "blocks.safetensors", **source)
        assert pieces and got == reference, dtype


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(block=st.integers(1, 3000), kind=st.sampled_from(["tvq4", "tvq3", "rtvq", "fq8", "fp32"]))
def test_any_block_size_gives_the_same_bytes(inputs, tmp_path, monkeypatch, block, kind):
    source = {"pre": inputs["pre"], "finetuned": inputs["fts"]} if kind == "fp32" else {"pre": inputs["pre"], "packs": [inputs["packs"][kind]]}
    reference, _ = _merged_bytes(monkeypatch, WHOLE, "task_arithmetic", {}, tmp_path / "whole.safetensors", **source)
    got, _ = _merged_bytes(monkeypatch, block, "task_arithmetic", {}, tmp_path / "blocks.safetensors", **source)
    assert got == reference


def test_non_block_methods_and_torch_outputs_merge_whole(inputs, tmp_path, monkeypatch):
    source = {"pre": inputs["pre"], "packs": [inputs["packs"]["tvq4"]]}
    reference, _ = _merged_bytes(monkeypatch, WHOLE, "breadcrumbs", {}, tmp_path / "whole.safetensors", **source)
    got, pieces = _merged_bytes(monkeypatch, 24, "breadcrumbs", {}, tmp_path / "blocks.safetensors", **source)
    assert pieces == [] and got == reference


def test_a_tampered_block_fails_and_writes_nothing(inputs, tmp_path, monkeypatch):
    pack = tmp_path / "pack"
    shutil.copytree(inputs["packs"]["tvq4_plain"], pack)
    manifest = json.loads((pack / "manifest.json").read_text())
    task_file = pack / manifest["tasks"][1]["file"]
    data = bytearray(task_file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    end = json.loads(data[8 : 8 + header_len])["embed.weight"]["data_offsets"][1]
    data[8 + header_len + end - 1] ^= 0x01  # embed.weight's last codes: read by its last block
    task_file.write_bytes(bytes(data))
    out = tmp_path / "merged.safetensors"
    monkeypatch.setattr(blocks_module, "BLOCK_ELEMENTS", 64)
    reader, vectors = load_task_vectors(inputs["pre"], packs=[pack])
    with pytest.raises(PackError, match="checksum mismatch"):
        merge("task_arithmetic", reader, vectors, out, {})
    assert not out.exists()


def test_sharded_folder_outputs_match(inputs, tmp_path, monkeypatch):
    reader, vectors = load_task_vectors(inputs["pre"], packs=[inputs["packs"]["rtvq"]])
    folders = {}
    for block in (WHOLE, 40):
        monkeypatch.setattr(blocks_module, "BLOCK_ELEMENTS", block)
        folders[block] = tmp_path / f"out{block}"
        merge("average", reader, vectors, folders[block], {}, out_kind="folder", max_shard_size=30000, card=False)
    names = sorted(p.name for p in folders[WHOLE].iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) >= 2
    assert names == sorted(p.name for p in folders[40].iterdir())
    for name in names:
        assert (folders[WHOLE] / name).read_bytes() == (folders[40] / name).read_bytes(), name


def test_blocks_shrink_with_the_tasks_under_a_memory_limit(monkeypatch):
    """A block's working set (about T + 3 fp32 rows) stays within 1/``BLOCK_SHARE`` of the
    memory limit: under 1 GiB, 16 tasks merge 1 Mi elements at a time, 4 tasks the usual 4 Mi."""
    monkeypatch.setattr(blocks_module, "memory_limit", lambda: 1 << 30)
    assert blocks_module.block_elements(None, 4) == blocks_module.BLOCK_ELEMENTS == 1 << 22
    assert blocks_module.block_elements(None, 8) == 1 << 21
    assert blocks_module.block_elements(None, 16) == 1 << 20
    assert (16 + 3) * 4 * blocks_module.block_elements(None, 16) <= (1 << 30) // blocks_module.BLOCK_SHARE
    assert blocks_module.block_elements(None, 0) == blocks_module.BLOCK_ELEMENTS  # no stack: nothing to fit
    assert blocks_module.block_elements(1000, 16) == 1000  # a block asked for is kept
    monkeypatch.setattr(blocks_module, "memory_limit", lambda: 1 << 20)
    assert blocks_module.block_elements(None, 16) == blocks_module.MIN_BLOCK_ELEMENTS
    monkeypatch.setattr(blocks_module, "memory_limit", lambda: 1 << 40)
    assert blocks_module.block_elements(None, 16) == blocks_module.BLOCK_ELEMENTS


@pytest.mark.parametrize(("method", "options"), [("consensus", {}), ("ties", {}), ("emr", {})])
def test_blocks_fitted_to_a_memory_limit_merge_the_same_bytes(inputs, tmp_path, monkeypatch, method, options):
    """Under a tight limit the blocks shrink (here to 64 elements) and more tensors stream: the same file."""
    source = {"pre": inputs["pre"], "packs": [inputs["packs"]["rtvq"]]}
    task = "t0" if method == "emr" else None
    reference, _ = _merged_bytes(monkeypatch, WHOLE, method, options, tmp_path / "whole.safetensors", task=task, **source)
    pieces = spy_block_writes(monkeypatch, blocks_module.BLOCK_ELEMENTS)
    monkeypatch.setattr(blocks_module, "MIN_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(blocks_module, "memory_limit", lambda: 8 << 10)  # 8 KiB / 8 / ((T + 3) * 4): the minimum
    monkeypatch.setattr(ties_module, "whole_tensor_bytes", lambda: 0)  # TIES streams every tensor larger than a block
    reader, vectors = load_task_vectors(source["pre"], packs=source["packs"])
    out = tmp_path / "fitted.safetensors"
    merge(method, reader, vectors, out, options, task=task)
    assert "embed.weight" in pieces and "layers.0.weight" in pieces  # 64-element blocks: even the small ones stream
    assert out.read_bytes() == reference
