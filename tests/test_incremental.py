"""Incremental RTVQ: add tasks without re-encoding the others; re-base on demand."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tvq import QuantizeOptions, open_pack, quantize
from tvq.cli import app
from tvq.encode.incremental import add_tasks, rebase
from tvq.errors import CheckpointError, ConfigError
from tvq.quant.affine import fake_quantize

from conftest import finetune

RTVQ = QuantizeOptions(bits=2, residual=True, base_bits=3, error_correction=True)


def two_of(tiny: dict) -> dict:
    return {n: tiny["ft_paths"][n] for n in ("task0", "task1")}


@pytest.fixture
def grown(tiny):
    two = {n: tiny["ft_paths"][n] for n in ("task0", "task1")}
    quantize(tiny["pre_path"], two, tiny["dir"] / "p2", RTVQ, progress=False)
    return tiny


def test_add_task_keeps_old_files_and_base_byte_for_byte(grown):
    d = grown["dir"]
    add_tasks(d / "p2", {"task2": grown["ft_paths"]["task2"]}, d / "p3", pretrained=grown["pre_path"], progress=False)
    old, new = open_pack(d / "p2"), open_pack(d / "p3")
    assert new.tasks == ["task0", "task1", "task2"]
    for rel in old.manifest.files:
        assert (d / "p2" / rel).read_bytes() == (d / "p3" / rel).read_bytes()
    key = "encoder.layer.1.mlp.weight"
    beta_hat = old.base_tensor(key)
    off = grown["fts"]["task2"][key] - (grown["pre"][key] + beta_hat)
    assert torch.equal(new.task_tensor("task2", key), beta_hat + fake_quantize(off, 2))
    assert new.manifest.task("task2").reference == "quantized_base"
    new.verify()


def test_add_in_place_via_cli_and_errors(grown):
    d = grown["dir"]
    r = CliRunner().invoke(
        app, ["add", str(d / "p2"), "-f", f"task2={grown['ft_paths']['task2']}", "--in-place", "-p", str(d / "pre.safetensors"), "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert open_pack(d / "p2").tasks == ["task0", "task1", "task2"]
    r = CliRunner().invoke(app, ["add", str(d / "p2"), "-f", f"task2={grown['ft_paths']['task2']}", "--in-place", "-p", str(d / "pre.safetensors")])
    assert r.exit_code == 2 and "already in the pack" in r.output
    r = CliRunner().invoke(app, ["add", str(d / "p2"), "-f", f"x={grown['ft_paths']['task2']}"])
    assert r.exit_code == 2 and "--in-place" in r.output


def test_add_refuses_a_different_pretrained_model(grown):
    d = grown["dir"]
    other = {k: v + 1 if v.is_floating_point() else v for k, v in grown["pre"].items()}
    save_file(other, d / "other.safetensors")
    save_file(finetune(other, 7), d / "t7.safetensors")
    with pytest.raises(CheckpointError, match="not the pretrained model"):
        add_tasks(d / "p2", {"t7": d / "t7.safetensors"}, d / "p3", pretrained=d / "other.safetensors", progress=False)
    assert not (d / "p3").exists()


def test_rebase_equals_a_fresh_pack(grown):
    d = grown["dir"]
    add_tasks(d / "p2", {"task2": grown["ft_paths"]["task2"]}, d / "p3", pretrained=grown["pre_path"], progress=False)
    rebase(d / "p3", d / "rebased", pretrained=grown["pre_path"], finetuned=grown["ft_paths"], progress=False)
    quantize(grown["pre_path"], grown["ft_paths"], d / "fresh", RTVQ, progress=False)
    a, b = open_pack(d / "rebased"), open_pack(d / "fresh")
    for t in a.tasks:
        for k in a.keys:
            assert torch.equal(a.task_tensor(t, k), b.task_tensor(t, k))


def test_rebase_from_pack_and_changed_sources(grown):
    d = grown["dir"]
    rebase(d / "p2", d / "fp", pretrained=grown["pre_path"], from_pack=True, progress=False)
    assert open_pack(d / "fp").tasks == ["task0", "task1"]
    save_file(finetune(grown["pre"], 9), grown["ft_paths"]["task1"])  # the source changed
    with pytest.raises(CheckpointError, match="content differs"):
        rebase(d / "p2", d / "r", pretrained=grown["pre_path"], finetuned=two_of(grown), progress=False)
    assert not (d / "r").exists()
    quantize(grown["pre_path"], {"a": grown["ft_paths"]["task0"]}, d / "tvq", QuantizeOptions(bits=4), progress=False)
    with pytest.raises(ConfigError, match="only RTVQ"):
        rebase(d / "tvq", d / "r", progress=False)


def test_packs_with_sha256_input_digests_still_grow_and_rebase(grown):
    """Packs made before BLAKE3 record bare sha256 hex digests: adding to them and re-basing
    them hash the inputs with sha256, so their own inputs are still recognised."""
    d = grown["dir"]
    two = {n: grown["ft_paths"][n] for n in ("task0", "task1")}
    quantize(grown["pre_path"], two, d / "old", RTVQ, progress=False, digest_algorithm="sha256")
    old = open_pack(d / "old").manifest
    assert ":" not in old.pretrained.digest and len(old.pretrained.digest) == 64
    assert open_pack(d / "p2").manifest.pretrained.digest.startswith("blake3:")
    add_tasks(d / "old", {"task2": grown["ft_paths"]["task2"]}, d / "old3", pretrained=grown["pre_path"], progress=False)
    grown3 = open_pack(d / "old3").manifest
    assert grown3.pretrained.digest == old.pretrained.digest
    assert ":" not in grown3.task("task2").source.digest
    rebase(
        d / "old3", d / "rebased", pretrained=grown["pre_path"], finetuned=grown["ft_paths"], progress=False
    )  # checks every source against its sha256
    assert open_pack(d / "rebased").manifest.pretrained.digest == old.pretrained.digest
    save_file(finetune(grown["pre"], 9), grown["ft_paths"]["task1"])
    with pytest.raises(CheckpointError, match="content differs"):
        rebase(d / "old3", d / "r", pretrained=grown["pre_path"], finetuned=grown["ft_paths"], progress=False)
