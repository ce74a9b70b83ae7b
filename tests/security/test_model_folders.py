"""Model folders from strangers: hostile or clumsy shard indexes, files that are not files,
torch pickles. Each bad input gives one ``error:`` line naming the file and the problem,
exit code 2, and nothing is read outside the folder named, nor written anywhere."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tvq import TaskVector, open_checkpoint
from tvq.cli import app
from tvq.errors import CheckpointError
from tvq.io.readers import MAX_HEADER_BYTES, MAX_INDEX_BYTES

from attack import one_line_refusal, snapshot
from conftest import finetune, make_model

INDEX = "model.safetensors.index.json"


class Custom:
    """A class weights_only=True does not know: pickled by reference, never imported back."""

    def __init__(self) -> None:
        self.w = torch.ones(2)


@pytest.fixture
def hood(tmp_path: Path) -> dict:
    """A sharded pretrained folder, a fine-tuned file, and bait next to the folder: real
    tensors of the right names and shapes that a shard index must not be able to reach."""
    pre = make_model(0)
    folder = tmp_path / "pre"
    folder.mkdir()
    keys = sorted(pre)
    weight_map = {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: pre[k] for k in keys[i::2]}, folder / name)
        weight_map |= dict.fromkeys(keys[i::2], name)
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file(finetune(pre, 1), tmp_path / "ft.safetensors")
    save_file(finetune(pre, 2), tmp_path / "outside.safetensors")
    return {"root": tmp_path, "folder": folder, "weight_map": weight_map, "pre": pre, "out": tmp_path / "out"}


def write_index(hood: dict, body: object) -> None:
    (hood["folder"] / INDEX).write_text(json.dumps(body))


def quantize_fails(hood: dict, *fragments: str, pretrained: Path | str | None = None, finetuned: Path | str | None = None) -> str:
    """Run ``tvq quantize`` on the neighbourhood: exit 2, one error line holding every
    fragment, no traceback, no output, and not one byte changed around it."""
    before = snapshot(hood["root"], skip=hood["out"])
    args = ["quantize", "-p", str(pretrained or hood["folder"]), "-f", f"a={finetuned or hood['root'] / 'ft.safetensors'}",
            "--out", str(hood["out"]), "--no-progress"]
    line = one_line_refusal(CliRunner().invoke(app, args), *fragments)
    assert not hood["out"].exists()
    assert snapshot(hood["root"], skip=hood["out"]) == before
    return line


def test_the_neighbourhood_works_when_nothing_is_wrong(hood):
    result = CliRunner().invoke(app, ["quantize", "-p", str(hood["folder"]), "-f", f"a={hood['root'] / 'ft.safetensors'}",
                                      "--out", str(hood["out"]), "--no-progress"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([1, 2], "a JSON list, expected an object with a 'weight_map'"),
        ({"weight_map": [["a", "b"]]}, "'weight_map' must map tensor names to shard files, got a JSON list"),
        ({"weight_map": {}}, "got an empty object"),
        ({"metadata": {}}, "got nothing"),
        ({"weight_map": {"embeddings.position_ids": 3}}, "tensor 'embeddings.position_ids': shard file name must be a string, got int"),
        ({"weight_map": {"x" * 2000: "model-00001-of-00002.safetensors"}}, "tensor name of 2000 characters (at most 1024)"),
        ({"weight_map": {"a\nb": "model-00001-of-00002.safetensors"}}, "contains a control character"),
        ({"weight_map": {"embeddings.position_ids": "../outside.safetensors"}}, "has a '..' component"),
        ({"weight_map": {"embeddings.position_ids": "/etc/hostname"}}, "'/etc/hostname' is an absolute path"),
        ({"weight_map": {"embeddings.position_ids": "..\\outside.safetensors"}}, "contains a backslash"),
    ],
)
def test_bad_shard_index(hood, body, problem):
    write_index(hood, body)
    quantize_fails(hood, INDEX, problem)


def test_a_name_pointing_outside_cannot_reach_the_bait_even_when_the_rest_is_valid(hood):
    """Every tensor of the bait has the right name and shape: only confinement stops it."""
    write_index(hood, {"weight_map": dict.fromkeys(hood["weight_map"], "../outside.safetensors")})
    quantize_fails(hood, INDEX, "'../outside.safetensors'", "'..' component")


def test_a_symlinked_shard_pointing_outside_is_refused(hood):
    shard = hood["folder"] / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(hood["root"] / "outside.safetensors")
    quantize_fails(hood, INDEX, "'model-00002-of-00002.safetensors' leads outside", "symlink")


def test_an_oversized_index_is_not_read(hood):
    with open(hood["folder"] / INDEX, "r+b") as fh:
        fh.truncate(MAX_INDEX_BYTES + 1)  # sparse: costs no disk
    quantize_fails(hood, INDEX, f"{MAX_INDEX_BYTES + 1} bytes, at most {MAX_INDEX_BYTES}")


def test_an_index_that_is_not_json(hood):
    (hood["folder"] / INDEX).write_text("{" * 100_000)
    quantize_fails(hood, INDEX, "not a valid shard index")


def test_shards_in_a_hugging_face_cache_snapshot_may_link_into_its_blobs(tmp_path):
    """huggingface_hub stores every file of a snapshot as a symlink to ../../blobs/<hash>."""
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    pre = make_model(0)
    keys = sorted(pre)
    weight_map = {}
    for i in range(2):
        blob = repo / "blobs" / f"{i}deadbeef"
        save_file({k: pre[k] for k in keys[i::2]}, blob)
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        (snap / name).symlink_to(Path("../../blobs") / blob.name)
        weight_map |= dict.fromkeys(keys[i::2], name)
    (repo / "blobs" / "index").write_text(json.dumps({"weight_map": weight_map}))
    (snap / INDEX).symlink_to("../../blobs/index")
    reader = open_checkpoint(snap)
    assert sorted(reader.keys()) == keys
    assert torch.equal(reader.get(keys[0]), pre[keys[0]])
    save_file(pre, tmp_path / "elsewhere.safetensors")  # but not outside the cache's blobs
    (snap / "model-00001-of-00002.safetensors").unlink()
    (snap / "model-00001-of-00002.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="leads outside"):
        open_checkpoint(snap)


def test_several_unindexed_safetensors_files_are_not_guessed_between(hood):
    folder = hood["root"] / "two"
    folder.mkdir()
    save_file(hood["pre"], folder / "a.safetensors")
    save_file(hood["pre"], folder / "b.safetensors")
    quantize_fails(hood, "two: folder holds 2 safetensors files and no index (a.safetensors, b.safetensors)",
                   "name one file or add model.safetensors.index.json", pretrained=folder)


@pytest.mark.parametrize("path", ["/proc/self/environ", "/proc/self/fd/0", "/sys/kernel/mm", "/dev/stdin"])
def test_kernel_pseudo_files_are_refused(hood, path):
    # /dev/stdin ends wherever fd 0 points (a pipe, a tty, /dev/null): refused either way
    quantize_fails(hood, path, *(["kernel pseudo-file"] if path.startswith(("/proc", "/sys")) else []), pretrained=path)


def test_a_fifo_is_refused_without_blocking(hood):
    fifo = hood["root"] / "pipe.safetensors"
    os.mkfifo(fifo)
    quantize_fails(hood, "pipe.safetensors", "not a regular file (a FIFO)", pretrained=fifo)
    quantize_fails(hood, "pipe.safetensors", "not a regular file (a FIFO)", finetuned=fifo)


def test_a_fifo_in_place_of_a_shard_or_model_file_is_refused(hood):
    shard = hood["folder"] / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    quantize_fails(hood, "model-00002-of-00002.safetensors", "a FIFO")
    folder = hood["root"] / "single"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    quantize_fails(hood, "model.safetensors", "a FIFO", pretrained=folder)
    os.mkfifo(hood["root"] / "pipe.index.json")
    quantize_fails(hood, "pipe.index.json", "a FIFO", pretrained=hood["root"] / "pipe.index.json")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / INDEX)
    quantize_fails(hood, INDEX, "a FIFO", pretrained=folder)


def test_a_character_device_is_refused(hood):
    quantize_fails(hood, "/dev/zero", "not a regular file (a character device)", pretrained="/dev/zero")


def write_header(path: Path, length: int | None, body: bytes) -> None:
    path.write_bytes((b"" if length is None else struct.pack("<Q", length)) + body)


@pytest.mark.parametrize(
    ("length", "body", "problem"),
    [
        (MAX_HEADER_BYTES + 1, b"{}" + b" " * 64, f"header of {MAX_HEADER_BYTES + 1} bytes, more than the {MAX_HEADER_BYTES} the format allows"),
        (2**64 - 1, b"{}", "more than the"),
        (1000, b"{}", "header of 1000 bytes runs past the end"),
        (4, b"{{{{", "not a readable safetensors file (header:"),
        (2, b"[]", "header is a JSON list"),
        (None, b"abc", "only 3 bytes"),
    ],
)
def test_bad_safetensors_header(hood, length, body, problem):
    bad = hood["root"] / "bad.safetensors"
    write_header(bad, length, body)
    quantize_fails(hood, "bad.safetensors", problem, finetuned=bad)


def test_a_tensor_whose_dtype_kind_differs_is_not_called_missing(hood):
    ft = finetune(hood["pre"], 1)
    ft["encoder.layer.0.attn.bias"] = torch.zeros(16, dtype=torch.int64)
    save_file(ft, hood["root"] / "ft_int.safetensors")
    quantize_fails(hood, "ft_int.safetensors", "tensor 'encoder.layer.0.attn.bias'", "dtype differs (int64 vs float32)",
                   finetuned=hood["root"] / "ft_int.safetensors")
    ft = finetune(hood["pre"], 1)
    ft["embeddings.position_ids"] = ft["embeddings.position_ids"].float()
    save_file(ft, hood["root"] / "ft_float.safetensors")
    quantize_fails(hood, "tensor 'embeddings.position_ids'", "dtype differs (float32 vs int64)",
                   finetuned=hood["root"] / "ft_float.safetensors")


def test_a_corrupt_torch_file_gets_no_pickle_advice(hood):
    for name, data in (("junk.pt", os.urandom(256)), ("junkzip.pt", b"PK\x03\x04" + os.urandom(256)), ("text.bin", b"hello\n")):
        (hood["root"] / name).write_bytes(data)
        line = quantize_fails(hood, name, "not a readable torch file (", finetuned=hood["root"] / name)
        assert "unsafe-pickle" not in line and "\x1b" not in line


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickled_class_is_read_inertly_and_one_only_code_reads_gets_the_advice(hood, legacy):
    path = hood["root"] / "custom.pt"
    torch.save({"w": torch.ones(2), "extra": Custom()}, path, _use_new_zipfile_serialization=not legacy)
    assert open_checkpoint(path).keys() == ["w"]  # Custom is recorded, never imported nor built
    sparse = torch.nn.Linear(3, 2)
    sparse.weight = torch.nn.Parameter(torch.eye(2, 3).to_sparse())
    torch.save({"model": sparse}, path, _use_new_zipfile_serialization=not legacy)
    line = quantize_fails(hood, "custom.pt", "cannot be read without running its code", "pass --unsafe-pickle", finetuned=path)
    assert "\x1b" not in line


def test_a_pickle_calling_os_functions_is_never_loaded(hood, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = hood["root"] / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    quantize_fails(hood, "evil.pt", "blocked module", finetuned=path)
    result = CliRunner().invoke(app, ["quantize", "-p", str(path), "-f", f"a={path}", "--out", str(hood["out"]), "--unsafe-pickle", "--no-progress"])
    assert result.exit_code == 2 and "blocked module" in result.output
    assert not (tmp_path / "pwned").exists()


# -- torch files, directly ---------------------------------------------------------------


def test_legacy_torch_files_load_with_weights_only(tmp_path, monkeypatch):
    """torch cannot map the pre-1.6 format: it is read instead, still with weights_only=True."""
    sd = make_model(0)
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(sd, tmp_path / "zip.pt")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for name, mapped in (("legacy.pt", False), ("zip.pt", True)):
        calls.clear()
        reader = open_checkpoint(tmp_path / name)
        assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": mapped}]
        assert sorted(reader.keys()) == sorted(sd)
        for k, v in sd.items():
            assert torch.equal(reader.get(k), v)


def test_a_legacy_file_with_a_custom_class_is_read_inertly(tmp_path):
    torch.save({"w": torch.ones(2), "extra": Custom()}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no full pickle, with or without the flag
        for unsafe in (False, True):
            reader = open_checkpoint(tmp_path / "old.pt", unsafe_pickle=unsafe)
            assert reader.keys() == ["w"] and torch.equal(reader.get("w"), torch.ones(2))


@pytest.mark.parametrize("key", ["model", "state_dict", "module", "model_state_dict"])
def test_a_state_dict_nested_in_a_training_checkpoint_is_unwrapped(tmp_path, key):
    sd = make_model(0)
    torch.save({key: sd, "epoch": 3, "optimizer": {"lr": 0.1}, "note": "x"}, tmp_path / "ckpt.pt")
    reader = open_checkpoint(tmp_path / "ckpt.pt")
    assert sorted(reader.keys()) == sorted(sd)
    assert torch.equal(reader.get("embeddings.position_ids"), sd["embeddings.position_ids"])


def test_non_tensor_values_of_a_state_dict_are_skipped(tmp_path):
    torch.save({"w": torch.ones(2), "step": 7, "cfg": {"a": 1}}, tmp_path / "sd.pt")
    assert open_checkpoint(tmp_path / "sd.pt").keys() == ["w"]


def test_a_dict_without_tensors_names_its_keys(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "model": {"step": 1}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"ckpt\.pt: holds no tensors.*its keys: 'epoch', 'optimizer', 'model'"):
        open_checkpoint(tmp_path / "ckpt.pt")
    torch.save({"model": {"w": torch.ones(1)}, "state_dict": {"w": torch.ones(1)}}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match=r"two\.pt: holds state dicts under both 'model' and 'state_dict'"):
        open_checkpoint(tmp_path / "two.pt")
    torch.save(torch.ones(3), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"t\.pt: holds a Tensor, not a state dict"):
        open_checkpoint(tmp_path / "t.pt")


def test_whole_modules_load_without_their_code(tmp_path):
    torch.save(torch.nn.Linear(3, 2), tmp_path / "m.pt")
    torch.save({"model": torch.nn.Linear(3, 2), "epoch": 1}, tmp_path / "wrapped.pt")
    for name in ("m.pt", "wrapped.pt"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for unsafe in (False, True):  # the restricted reader first, even with the flag
                assert sorted(open_checkpoint(tmp_path / name, unsafe_pickle=unsafe).keys()) == ["bias", "weight"]


def test_dtype_kind_check_directly(tmp_path):
    pre = make_model(0)
    save_file(pre, tmp_path / "pre.safetensors")
    ft = dict(pre) | {"encoder.layer.1.mlp.weight": torch.zeros(24, 16, dtype=torch.int32)}
    save_file(ft, tmp_path / "ft.safetensors")
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.mlp\.weight': dtype differs \(int32 vs float32\)"):
        TaskVector.from_checkpoints(tmp_path / "pre.safetensors", tmp_path / "ft.safetensors")
    del ft["encoder.layer.1.mlp.weight"]
    save_file(ft, tmp_path / "ft.safetensors")
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.mlp\.weight': missing"):
        TaskVector.from_checkpoints(tmp_path / "pre.safetensors", tmp_path / "ft.safetensors")
