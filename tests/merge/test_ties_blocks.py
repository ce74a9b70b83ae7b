"""TIES by blocks (tvq.merge.blocks, ``Ties.block_merger``) writes the bytes of the whole-tensor
TIES, whatever the block size: scope tensor and global, both tie rules, per-task densities and
weights, from checkpoints and every pack kind (2-bit codes: most entries tied at the cut-off;
a density above the non-zero fraction: a cut-off of 0)."""

from __future__ import annotations

import hashlib

import pytest
from test_merge_blocks import WHOLE, _merged_bytes, write_inputs

import tvq.merge.blocks as blocks_module
from tvq.merge import load_task_vectors, merge, ties_kernel
from tvq.merge.methods import ties as ties_module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    kinds = {
        "tvq4": {"bits": 4},
        "tvq2_plain": {"bits": 2, "entropy": "off"},
        "tvq2": {"bits": 2},
        "rtvq": {"bits": 2, "residual": True, "base_bits": 3, "error_correction": True},
        "rtvq_plain": {"bits": 2, "residual": True, "base_bits": 3, "entropy": "off"},
        "fq8": {"bits": 8, "target": "finetuned"},
    }
    written = write_inputs(tmp_path_factory.mktemp("ties_blocks"), kinds)
    root, fts, fts_bf16, packs = written["root"], written["fts"], written["fts_bf16"], written["packs"]
    sources = {"fp32": {"pre": root / "pre.safetensors", "finetuned": fts}, "bf16": {"pre": root / "pre_bf16.safetensors", "finetuned": fts_bf16}}
    sources.update({name: {"pre": root / "pre.safetensors", "packs": [path]} for name, path in packs.items()})
    sources["mixed"] = {"pre": root / "pre.safetensors", "packs": [packs["tvq2"]], "finetuned": {"x": fts["t1"]}}
    return sources


DEFAULT_WHOLE_TENSOR_BYTES = ties_module.WHOLE_TENSOR_BYTES


@pytest.fixture(autouse=True)
def stream_every_large_tensor(monkeypatch):
    """Here tensors are small: stream every one larger than a block, whatever its working set."""
    monkeypatch.setattr(ties_module, "WHOLE_TENSOR_BYTES", 0)


def test_only_tensors_whose_whole_working_set_is_large_stream_by_default():
    ties_module.WHOLE_TENSOR_BYTES = limit = DEFAULT_WHOLE_TENSOR_BYTES  # the fixture restores its 0 after
    method = ties_module.Ties(ties_module.TiesOptions(), ["a", "b", "c", "d"])
    per_element = (4 + 3) * 4
    assert not method.merges_by_blocks("w", limit // per_element)
    assert method.merges_by_blocks("w", limit // per_element + 1)


PER_TASK = {"t0": 0.1, "t1": 0.5, "t2": 0.3}
WEIGHTS = {"t0": 1.0, "t1": 0.5, "t2": 0.25}
OPTIONS = {
    "tensor_exact": {"scope": "tensor"},
    "tensor_keep_ties": {"scope": "tensor", "tie_rule": "keep_ties"},
    "tensor_zero_cut": {"scope": "tensor", "density": 0.6},  # above the non-zero fraction of τ: cut at 0
    "tensor_per_task": {"scope": "tensor", "density": PER_TASK, "lambda": 0.7},
    "tensor_keep_none_or_all": {"scope": "tensor", "density": {"t0": 0.0, "t1": 1.0, "t2": 0.3}},
    "tensor_weighted": {"scope": "tensor", "weight": WEIGHTS, "aggregate": "sum"},
    "tensor_per_task_weighted_keep_ties": {"scope": "tensor", "density": PER_TASK, "weight": WEIGHTS, "tie_rule": "keep_ties"},
    "global_exact": {},
    "global_keep_ties": {"tie_rule": "keep_ties"},
    "global_zero_cut": {"density": 0.6},
    "global_weighted": {"weight": WEIGHTS, "lambda": 1.0},
}


def _options(options: dict, source: str) -> dict:
    if source != "mixed":
        return options
    return {k: (0.3 if isinstance(v, dict) else v) for k, v in options.items()}  # task names differ: one value


@pytest.mark.parametrize("name", list(OPTIONS))
def test_ties_by_blocks_writes_the_whole_tensor_bytes(inputs, tmp_path, monkeypatch, name):
    for source, spec in inputs.items():
        options = _options(OPTIONS[name], source)
        reference, none = _merged_bytes(monkeypatch, WHOLE, "ties", options, tmp_path / "whole.safetensors", **spec)
        assert none == []
        for block in (1000,) if source != "tvq2" else (1000, 6144):  # ragged last blocks (20480 elements)
            got, pieces = _merged_bytes(monkeypatch, block, "ties", options, tmp_path / f"b{block}.safetensors", **spec)
            assert pieces == ["embed.weight"], (source, block)
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(reference).hexdigest(), (name, source, block)


@pytest.mark.parametrize("options", [{"scope": "tensor"}, {}], ids=["tensor", "global"])
def test_small_blocks_stream_every_large_tensor_alike(inputs, tmp_path, monkeypatch, options):
    """2-bit codes of 3 tasks: 64 combinations, so blocks merge from codes, a lookup table each
    but the last, ragged one (32 elements, fewer than the combinations): the compiled loop."""
    spec = inputs["tvq2"]
    reference, _ = _merged_bytes(monkeypatch, WHOLE, "ties", options, tmp_path / "whole.safetensors", **spec)
    coded = []
    compiled = []
    original = ties_module.TiesBlocks.merge_coded
    original_kernel = ties_kernel.coded_ties

    def spy(self, start, parts):
        merged = original(self, start, parts)
        coded.append(merged is not None)
        return merged

    def kernel_spy(*args, **kwargs):
        compiled.append(args[0][0].index.numel())
        return original_kernel(*args, **kwargs)

    monkeypatch.setattr(ties_module.TiesBlocks, "merge_coded", spy)
    monkeypatch.setattr(ties_kernel, "coded_ties", kernel_spy)
    got, pieces = _merged_bytes(monkeypatch, 96, "ties", options, tmp_path / "blocks.safetensors", **spec)
    assert set(pieces) == {"embed.weight", "layers.0.weight", "layers.1.weight"}
    assert got == reference
    assert all(coded)
    assert compiled == [32]  # embed.weight's last block


def test_the_kept_density_and_bytes_read_count_the_same_entries(inputs, tmp_path, monkeypatch):
    for options in ({"scope": "tensor"}, {"scope": "tensor", "tie_rule": "keep_ties", "density": PER_TASK}, {}):
        reports = []
        for block in (WHOLE, 1000):
            monkeypatch.setattr(blocks_module, "BLOCK_ELEMENTS", block)
            spec = inputs["tvq2"]
            reader, vectors = load_task_vectors(spec["pre"], packs=spec["packs"])
            reports.append(merge("ties", reader, vectors, tmp_path / "out.safetensors", options, overwrite=True))
        whole, blocks = reports
        assert blocks.kept == whole.kept, options
        if options.get("scope") == "tensor":  # the per-tensor pre-passes read embed.weight again
            assert blocks.bytes_read > whole.bytes_read
        else:
            assert blocks.bytes_read == whole.bytes_read


def test_the_switch_turns_ties_by_blocks_off(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(ties_module, "TIES_BY_BLOCKS", False)
    _, pieces = _merged_bytes(monkeypatch, 96, "ties", {}, tmp_path / "blocks.safetensors", **inputs["tvq4"])
    assert pieces == []


def test_per_tensor_cut_offs_come_from_code_histograms_when_every_input_is_coded(inputs, tmp_path, monkeypatch):
    used = []
    original = ties_module.code_select

    def spy(parts, ks):
        found = original(parts, ks)
        used.append(found is not None)
        return found

    monkeypatch.setattr(ties_module, "code_select", spy)
    for source, coded in (("rtvq", True), ("fq8", False), ("fp32", False), ("mixed", False)):
        used.clear()
        _merged_bytes(monkeypatch, 1000, "ties", {"scope": "tensor"}, tmp_path / "blocks.safetensors", **inputs[source])
        assert used == [coded], source
