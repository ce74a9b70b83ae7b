"""Checkpoint formats: safetensors, sharded HF folders, torch files (safely), half precisions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tvq import QuantizeOptions, TaskVector, open_checkpoint, open_pack, quantize
from tvq.cli import app
from tvq.errors import CheckpointError


def shard(sd: dict, folder, n: int = 2) -> None:
    """Write a HF-style sharded safetensors folder."""
    folder.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_file(part, folder / name)
        weight_map |= dict.fromkeys(part, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")


def test_sharded_folder_and_torch_file_give_the_same_task_vector(tiny):
    shard(tiny["pre"], tiny["dir"] / "pre_hf")
    torch.save(tiny["fts"]["task0"], tiny["dir"] / "ft.pt")
    reader = open_checkpoint(tiny["dir"] / "pre_hf")
    assert sorted(reader.keys()) == sorted(tiny["pre"])
    a = TaskVector.from_checkpoints(tiny["dir"] / "pre_hf", tiny["dir"] / "ft.pt")
    b = TaskVector.from_checkpoints(tiny["pre_path"], tiny["ft_paths"]["task0"])
    for k in b:
        assert torch.equal(a[k], b[k])


def test_state_dict_wrapped_in_a_dict(tiny):
    torch.save({"state_dict": tiny["pre"], "epoch": 3}, tiny["dir"] / "ckpt.pt")
    assert sorted(open_checkpoint(tiny["dir"] / "ckpt.pt").keys()) == sorted(tiny["pre"])


def test_pickled_module_reads_without_its_code_and_needs_the_flag_only_when_that_fails(tiny):
    model = torch.nn.Linear(3, 2)
    torch.save(model, tiny["dir"] / "module.pt")
    reader = open_checkpoint(tiny["dir"] / "module.pt")  # the restricted reader: no flag, no warning
    assert reader.keys() == ["weight", "bias"] and torch.equal(reader.get("weight"), model.weight.detach())
    model.weight = torch.nn.Parameter(torch.eye(2, 3).to_sparse())  # a tensor only code rebuilds
    torch.save(model, tiny["dir"] / "sparse.pt")
    with pytest.raises(CheckpointError, match=r"sparse\.pt: cannot be read without running its code \(tensor 'weight': .*sparse.*--unsafe-pickle"):
        open_checkpoint(tiny["dir"] / "sparse.pt")
    with pytest.warns(UserWarning, match="full pickle"):
        reader = open_checkpoint(tiny["dir"] / "sparse.pt", unsafe_pickle=True)
    assert sorted(reader.keys()) == ["bias", "weight"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_use_fp32_deltas(tiny, dtype):
    pre = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny["pre"].items()}
    ft = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny["fts"]["task1"].items()}
    save_file(pre, tiny["dir"] / "pre16.safetensors")
    save_file(ft, tiny["dir"] / "ft16.safetensors")
    quantize(tiny["dir"] / "pre16.safetensors", {"t": tiny["dir"] / "ft16.safetensors"}, tiny["dir"] / "p", QuantizeOptions(bits=8), progress=False)
    pack = open_pack(tiny["dir"] / "p")
    k = "encoder.layer.0.attn.bias"  # kept: exact fp32 difference of the half-precision values
    assert pack.task_tensor("t", k).dtype == torch.float32
    assert torch.equal(pack.task_tensor("t", k), ft[k].float() - pre[k].float())
    w = "encoder.layer.0.mlp.weight"
    tau = ft[w].float() - pre[w].float()
    assert float((pack.task_tensor("t", w) - tau).abs().max()) <= float(tau.max() - tau.min()) / 255


def test_cli_rejects_unsafe_pickle_by_default(tiny):
    model = torch.nn.Linear(3, 2)
    model.weight = torch.nn.Parameter(torch.eye(2, 3).to_sparse())
    torch.save(model, tiny["dir"] / "module.pt")
    r = CliRunner().invoke(
        app, ["quantize", "-p", str(tiny["dir"] / "module.pt"), "-f", f"a={tiny['dir'] / 'module.pt'}", "-o", str(tiny["dir"] / "p")]
    )
    assert r.exit_code == 2 and "without running its code" in r.output and "--unsafe-pickle" in r.output and "Traceback" not in r.output


def test_missing_shard_is_named(tiny):
    shard(tiny["pre"], tiny["dir"] / "pre_hf")
    (tiny["dir"] / "pre_hf" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        open_checkpoint(tiny["dir"] / "pre_hf")


def test_scalar_parameters_round_trip(tiny):
    """0-d tensors (CLIP's logit_scale) are kept exactly, in packs and in exports."""
    pre = dict(tiny["pre"]) | {"logit_scale": torch.tensor(4.6052)}
    ft = dict(tiny["fts"]["task0"]) | {"logit_scale": torch.tensor(4.7)}
    save_file(pre, tiny["dir"] / "pre_s.safetensors")
    save_file(ft, tiny["dir"] / "ft_s.safetensors")
    quantize(tiny["dir"] / "pre_s.safetensors", {"t": tiny["dir"] / "ft_s.safetensors"}, tiny["dir"] / "p", QuantizeOptions(bits=2), progress=False)
    tv = open_pack(tiny["dir"] / "p").task_tensor("t", "logit_scale")
    assert tv.shape == () and torch.equal(tv, ft["logit_scale"] - pre["logit_scale"])


def test_pack_reads_never_alias_each_other(tiny):
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "p", QuantizeOptions(bits=2), progress=False)
    pack = open_pack(tiny["dir"] / "p")
    k = "encoder.layer.0.attn.bias"
    first = pack.task_tensor("task0", k)
    first += 100.0
    assert float(pack.task_tensor("task0", k).abs().max()) < 1.0


def test_large_tensors_are_private_maps_of_the_file(tmp_path):
    """Big tensors are mapped copy-on-write: writing to one changes neither the file nor the next read."""
    from tvq.io.readers import MAP_MIN_BYTES

    big = torch.arange(MAP_MIN_BYTES // 4 + 3, dtype=torch.float32)
    path = tmp_path / "m.safetensors"
    save_file({"big": big, "small": torch.ones(3)}, path)
    before = path.read_bytes()
    reader = open_checkpoint(path)
    first = reader.get("big")
    assert torch.equal(first, big)
    first.mul_(-1)
    assert torch.equal(reader.get("big"), big)
    assert path.read_bytes() == before


def test_a_file_truncated_after_opening_fails_with_its_name(tmp_path):
    from tvq.io.readers import MAP_MIN_BYTES

    path = tmp_path / "t.safetensors"
    save_file({"big": torch.zeros(MAP_MIN_BYTES // 4 + 3)}, path)
    reader = open_checkpoint(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 16)
    with pytest.raises(CheckpointError, match=r"t\.safetensors.*big.*ends inside"):
        reader.get("big")
