"""EMR by blocks (tvq.merge.blocks): the unified pack (``unified.<key>`` appended by blocks, the
task-major mask rows spilled and appended) and a task's model (``EMR.block_merger``, after the
rescalers' pre-pass by blocks) have the bytes of the whole-tensor EMR, whatever the block size,
from checkpoints and every pack kind; the rescalers' sums do not depend on how a tensor is split."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file
from test_merge_blocks import WHOLE, _model, write_inputs

from tvq.merge import load_task_vectors, merge, open_emr
from tvq.merge.ops import SUM_CHUNK, ChunkSums

from merge_helpers import spy_block_writes


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    kinds = {
        "tvq4": {"bits": 4},
        "tvq2": {"bits": 2},
        "rtvq": {"bits": 2, "residual": True, "base_bits": 3, "error_correction": True},
        "rtvq_plain": {"bits": 2, "residual": True, "base_bits": 3, "entropy": "off"},
        "fq8": {"bits": 8, "target": "finetuned"},
    }
    written = write_inputs(tmp_path_factory.mktemp("emr_blocks"), kinds)
    root, fts, packs = written["root"], written["fts"], written["packs"]
    sources = {"fp32": {"pre": root / "pre.safetensors", "finetuned": fts},
               "bf16": {"pre": root / "pre_bf16.safetensors", "finetuned": written["fts_bf16"]}}  # fmt: skip
    sources.update({name: {"pre": root / "pre.safetensors", "packs": [path]} for name, path in packs.items()})
    sources["mixed"] = {"pre": root / "pre.safetensors", "packs": [packs["tvq2"]], "finetuned": {"x": fts["t1"]}}
    return sources


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Nine fp32 fine-tunes: from T = 8 on torch's own sum over tasks changes order with the size."""
    root = tmp_path_factory.mktemp("emr_many")
    pre = _model(0)
    save_file(pre, root / "pre.safetensors")
    fts = {}
    for i in range(9):
        g = torch.Generator().manual_seed(300 + i)
        fts[f"t{i}"] = root / f"t{i}.safetensors"
        save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in pre.items()}, fts[f"t{i}"])
    return {"pre": root / "pre.safetensors", "finetuned": fts}


def emr_bytes(monkeypatch, block, out, task=None, *, pre, packs=(), finetuned=None):
    """The bytes of EMR's unified pack (``task`` None) or of a task's model, and the tensors written by pieces."""
    pieces = spy_block_writes(monkeypatch, block)
    reader, vectors = load_task_vectors(pre, packs=list(packs), finetuned=finetuned)
    merge("emr", reader, vectors, out, task=task, overwrite=True)
    return out.read_bytes(), pieces


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_unified_pack_by_blocks_has_the_whole_tensor_bytes(inputs, tmp_path, monkeypatch):
    for source, spec in inputs.items():
        reference, none = emr_bytes(monkeypatch, WHOLE, tmp_path / "whole.safetensors", **spec)
        assert none == []
        for block in (1000, 96) if source in ("tvq2", "fp32") else (1000,):  # ragged last blocks (20480 elements)
            got, pieces = emr_bytes(monkeypatch, block, tmp_path / f"b{block}.safetensors", **spec)
            assert {"unified.embed.weight", "masks.embed.weight"} <= set(pieces), (source, block)
            assert _sha(got) == _sha(reference), (source, block)
    pack = open_emr(tmp_path / "b1000.safetensors")  # a valid pack: every checksum sealed at close
    assert pack.task_tensor(pack.tasks[0], "embed.weight").shape == (160, 128)


@pytest.mark.parametrize("task", ["t0", "t2"])
def test_a_task_model_by_blocks_has_the_whole_tensor_bytes(inputs, tmp_path, monkeypatch, task):
    for source, spec in inputs.items():
        name = "x" if source == "mixed" and task == "t2" else task
        reference, none = emr_bytes(monkeypatch, WHOLE, tmp_path / "whole.safetensors", name, **spec)
        assert none == []
        got, pieces = emr_bytes(monkeypatch, 1000, tmp_path / "blocks.safetensors", name, **spec)
        assert pieces == ["embed.weight"], source
        assert _sha(got) == _sha(reference), (source, task)


def test_a_task_model_from_the_unified_pack_matches_the_merge(inputs, tmp_path, monkeypatch):
    """The streamed unified pack reads back as the task's model merged by blocks from the inputs."""
    from tvq.merge import emr_task_model

    spec = inputs["tvq4"]
    emr_bytes(monkeypatch, 1000, tmp_path / "unified.safetensors", **spec)
    direct, _ = emr_bytes(monkeypatch, 1000, tmp_path / "direct.safetensors", "t1", **spec)
    emr_task_model(tmp_path / "unified.safetensors", spec["pre"], "t1", tmp_path / "from_pack.safetensors")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "direct.safetensors"), load_file(tmp_path / "from_pack.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nine_tasks_by_blocks(many, tmp_path, monkeypatch):
    reference, _ = emr_bytes(monkeypatch, WHOLE, tmp_path / "whole.safetensors", **many)
    got, pieces = emr_bytes(monkeypatch, 1000, tmp_path / "blocks.safetensors", **many)
    assert "unified.embed.weight" in pieces and got == reference
    reference, _ = emr_bytes(monkeypatch, WHOLE, tmp_path / "whole.safetensors", "t4", **many)
    got, pieces = emr_bytes(monkeypatch, 96, tmp_path / "blocks.safetensors", "t4", **many)
    assert pieces and got == reference


def test_chunk_sums_do_not_depend_on_the_split():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3 * SUM_CHUNK + 77, generator=g).abs() * torch.rand(2, 3 * SUM_CHUNK + 77, generator=g) ** 8
    whole = ChunkSums(2)
    for row in range(2):
        whole.add(row, values[row])
    expected = whole.finish()
    for cuts in ([8], [SUM_CHUNK - 8, 16], [1000] * 5, [SUM_CHUNK, SUM_CHUNK + 8, 4096]):
        sums, start = ChunkSums(2), 0
        for cut in [*cuts, values.shape[1]]:
            end = min(start + cut, values.shape[1])
            for row in range(2):
                sums.add(row, values[row, start:end])
            start = end
            if start == values.shape[1]:
                break
        assert torch.equal(sums.finish(), expected), cuts
    assert torch.allclose(expected, values.double().sum(dim=1), rtol=1e-12)


def _task_model_bytes(monkeypatch, block, unified, pre, task, out):
    from tvq.merge import emr_task_model

    pieces = spy_block_writes(monkeypatch, block)
    emr_task_model(unified, pre, task, out, overwrite=True)
    return out.read_bytes(), pieces


@pytest.mark.parametrize("task", ["t0", "t1", "t2"])  # first, middle and last mask rows
def test_a_task_model_from_the_unified_pack_streams_with_the_whole_bytes(inputs, tmp_path, monkeypatch, task):
    spec = inputs["rtvq"]
    emr_bytes(monkeypatch, WHOLE, tmp_path / "unified.safetensors", **spec)
    reference, none = _task_model_bytes(monkeypatch, WHOLE, tmp_path / "unified.safetensors", spec["pre"], task, tmp_path / "whole.safetensors")
    assert none == []
    for block in (1000, 96):
        got, pieces = _task_model_bytes(monkeypatch, block, tmp_path / "unified.safetensors", spec["pre"], task, tmp_path / "b.safetensors")
        assert "embed.weight" in pieces and got == reference, block


@pytest.mark.parametrize("tensor", ["unified", "masks_other_task", "masks_own_row"])
def test_a_tampered_unified_pack_fails_by_blocks_and_writes_nothing(inputs, tmp_path, monkeypatch, tensor):
    import json
    import struct

    from tvq.errors import PackError

    spec = inputs["tvq4"]
    path = tmp_path / "unified.safetensors"
    emr_bytes(monkeypatch, WHOLE, path, **spec)
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = "unified.embed.weight" if tensor == "unified" else "masks.embed.weight"
    begin, end = header[name]["data_offsets"]
    row = (end - begin) // 3
    at = {"unified": begin + 4 * 20000 + 1, "masks_other_task": begin + 2 * row + 5, "masks_own_row": begin + row + 7}[tensor]
    data[8 + length + at] ^= 0x10
    path.write_bytes(bytes(data))
    out = tmp_path / "t1.safetensors"
    with pytest.raises(PackError, match="checksum mismatch"):
        _task_model_bytes(monkeypatch, 1000, path, spec["pre"], "t1", out)
    assert not out.exists()
