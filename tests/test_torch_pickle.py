"""The paper's pickled checkpoints read without their code, and written back in their format."""

from __future__ import annotations

import io
import os
import pickle
import resource
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

import tvq.io.module_state as module_state
from torch_pickle_models import helper_module, importable, save_layout
from tvq.cli import app
from tvq.encode.options import QuantizeOptions
from tvq.encode.pipeline import quantize
from tvq.errors import CheckpointError, ConfigError
from tvq.io.layouts import task_folders, with_task_folders
from tvq.io.module_state import tensor_problem
from tvq.io.readers import open_checkpoint
from tvq.io.torch_archive import open_archive
from tvq.io.torch_pickle import Inert, StorageRef, TensorRef, load_program
from tvq.io.torch_pickle_reader import TorchPickleReader
from tvq.io.torch_pickle_writer import pickle_template, write_like
from tvq.pack.reader import open_pack
from tvq.quant.selection import KeyRule


@pytest.fixture(params=[False, True], ids=["zip", "legacy"])
def layout(request, tmp_path: Path) -> dict:
    return save_layout(tmp_path, legacy=request.param)


def assert_same_state(reader, state: dict[str, torch.Tensor]) -> None:
    assert reader.keys() == list(state)  # the names and the order of module.state_dict()
    for key, value in state.items():
        got = reader.get(key)
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(got, value), key


def test_a_pickled_module_reads_as_its_state_dict_without_its_classes(layout):
    assert layout["module"] not in sys.modules and str(layout["classes"]) not in sys.path
    for name, path in (("zeroshot", layout["dir"] / "zeroshot.pt"), ("Cars", layout["dir"] / "Cars" / "finetuned.pt")):
        reader = open_checkpoint(path)  # no --unsafe-pickle, no PYTHONPATH
        assert isinstance(reader, TorchPickleReader)
        assert_same_state(reader, layout["states"][name])
    keys = layout["states"]["zeroshot"]
    assert "model.visual.conv1.bias" not in keys and "model.visual.attn_mask" not in keys  # None parameter, non-persistent buffer
    assert "model.visual.bn.num_batches_tracked" in keys and "model.scale" in keys
    assert layout["module"] not in sys.modules  # nothing was imported while reading


def test_the_official_folder_layout_is_recognised(layout):
    task = open_checkpoint(layout["dir"] / "Cars")  # a task folder: its finetuned.pt (not its zeroshot.pt)
    assert_same_state(task, layout["states"]["Cars"])
    assert_same_state(open_checkpoint(layout["dir"]), layout["states"]["zeroshot"])  # the model folder: zeroshot.pt


def test_nested_modules_shared_tensors_and_views(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(OrderedDict(a=torch.nn.Linear(4, 4), b=torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))))
    net.b[0].weight = net.a.weight  # tied: state_dict names it twice
    base = torch.randn(10)
    net.register_buffer("whole", base)
    net.register_buffer("part", base[2:5])  # a view with an offset into the same storage
    net.add_module("again", net.a)  # a shared submodule: its tensors under both paths
    torch.save(net, tmp_path / "n.pt")
    reader = TorchPickleReader(tmp_path / "n.pt")
    assert_same_state(reader, net.state_dict())
    assert reader.refs["a.weight"].storage == reader.refs["b.0.weight"].storage == reader.refs["again.weight"].storage
    assert reader.refs["part"].offset == 2


def test_what_the_classes_hold_is_recorded_never_run(layout, tmp_path):
    archive = open_archive(layout["dir"] / "zeroshot.pt")
    root = archive.root
    assert isinstance(root, Inert) and root.qualname == f"{layout['module']}.ImageEncoder"
    pre = root.state["train_preprocess"]
    assert isinstance(pre, Inert) and pre.qualname.endswith(".Preprocess")
    assert isinstance(pre.state["mode"], Inert) and pre.state["mode"].args == ("bilinear",)  # the enum: its class never called
    assert isinstance(pre.state["mean"], TensorRef)
    assert root.state["val_preprocess"] is pre  # shared objects stay shared
    assert f"{layout['module']}.ImageEncoder" in archive.globals


def test_a_function_of_an_importable_module_is_recorded_not_called(tmp_path):
    folder, name = helper_module(tmp_path)
    marker = tmp_path / "ran"
    with importable(folder, name) as mod:

        class Call:
            def __reduce__(self):
                return (mod.touch, (str(marker),))

        sd = {"w": torch.ones(2), "hook": Call()}
        torch.save(sd, tmp_path / "f.pt")
        program = pickle.dumps(Call(), protocol=2)
        reader = TorchPickleReader(tmp_path / "f.pt")  # the module is importable right now: still not called
        assert reader.keys() == ["w"]
        call = load_program(program)
        assert isinstance(call, Inert) and call.qualname == f"{name}.touch" and call.args == (str(marker),)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    "callable_, argument",
    [(os.system, "touch {marker}"), (eval, "__import__('os').system('touch {marker}')"), (exec, "open('{marker}', 'w')")],
)
def test_a_pickle_that_runs_code_is_refused_in_one_line(tmp_path, callable_, argument, legacy):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (callable_, (argument.format(marker=marker),))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil()}, path, _use_new_zipfile_serialization=not legacy)
    for read in (TorchPickleReader, open_checkpoint, lambda p: open_checkpoint(p, unsafe_pickle=True)):
        with pytest.raises(CheckpointError) as info:
            read(path)
        line = str(info.value)
        assert line.startswith(str(path)) and "\n" not in line and "\x1b" not in line
        assert "not even with --unsafe-pickle" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    "program",
    [
        b"cos\nsystem\n(S'touch MARK'\ntR.",  # protocol 0 GLOBAL + REDUCE
        b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R.",  # GLOBAL builtins eval
        b"\x80\x04\x8c\x02os\x8c\x06system\x93X\x0a\x00\x00\x00touch MARK\x85R.",  # STACK_GLOBAL
        b"\x80\x02c__builtin__\n__import__\nX\x02\x00\x00\x00os\x85R.",
    ],
)
def test_hand_written_programs_are_refused_before_anything_runs(tmp_path, program):
    marker = tmp_path / "MARK"  # what the programs would create, in the folder they run in
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(CheckpointError, match="not even with --unsafe-pickle"):
            TorchPickleReader(write_zip(tmp_path / "hand.pt", program, {}))
    finally:
        os.chdir(cwd)
    assert not marker.exists()


# -- bounds: a stranger's geometry -------------------------------------------------------------


class _Storage:
    """Pickled as a persistent id of our choosing."""

    def __init__(self, pid: tuple) -> None:
        self.pid = pid


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Storage) else None


def program_of(obj: object) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_zip(path: Path, program: bytes, storages: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", program)
        zf.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return path


def crafted(tmp_path: Path, offset=0, size=(4,), stride=(1,), numel=4, key="0", data_bytes=16, name="w") -> Path:
    storage = _Storage(("storage", torch.FloatStorage, key, "cpu", numel))
    program = program_of({name: _Tensor(storage, offset, size, stride)})
    return write_zip(tmp_path / "crafted.pt", program, {"0": bytes(data_bytes)})


def test_a_crafted_file_within_bounds_reads(tmp_path):
    reader = TorchPickleReader(crafted(tmp_path, offset=1, size=(3,), stride=(1,)))
    assert torch.equal(reader.get("w"), torch.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"offset": 2, "size": (4,)}, "elements up to 5 of a storage of 4"),
        ({"size": (2, 2), "stride": (1 << 40, 1)}, "of a storage of 4"),
        ({"size": (-1,)}, "negative offset, size or stride"),
        ({"stride": (-1,)}, "negative offset, size or stride"),
        ({"offset": -3}, "negative offset, size or stride"),
        ({"numel": 1 << 40}, "holds 16 bytes, but the program says 1099511627776 elements"),
        ({"key": "7"}, "names storage '7', which the file does not hold"),
        ({"key": "../../etc/passwd"}, "storage key"),
        ({"size": (4, 1 << 62), "stride": (0, 0)}, "more than the cap"),
    ],
)
def test_storage_bounds_attacks_are_refused_in_one_line(tmp_path, kwargs, problem):
    path = crafted(tmp_path, **kwargs)
    with pytest.raises(CheckpointError) as info:
        TorchPickleReader(path)
    line = str(info.value)
    assert line.startswith(str(path)) and problem in line and "\n" not in line


def test_the_element_cap_follows_the_environment(tmp_path, monkeypatch):
    path = crafted(tmp_path)
    monkeypatch.setenv("TVQ_MAX_TENSOR_ELEMENTS", "3")
    with pytest.raises(CheckpointError, match=r"tensor 'w': 4 elements, more than the cap of 3"):
        TorchPickleReader(path)


def test_broken_archives_are_one_line(tmp_path):
    good = crafted(tmp_path)
    data = good.read_bytes()
    for name, blob in (("trunc.pt", data[: len(data) // 2]), ("noise.pt", b"PK\x03\x04" + os.urandom(200)), ("plain.pt", pickle.dumps({"a": 1}))):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError) as info:
            TorchPickleReader(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)
    with zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", program_of({"a": 1}))
    with pytest.raises(CheckpointError, match="is compressed"):
        TorchPickleReader(tmp_path / "deflated.pt")


@settings(max_examples=150, deadline=None)
@given(
    numel=st.integers(0, 40),
    offset=st.integers(0, 45),
    dims=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 12)), min_size=0, max_size=3),
)
def test_geometry_checks_agree_with_torch(numel, offset, dims):
    """A view the reader accepts is one torch itself can lay over the storage, and the reverse."""
    shape = tuple(d[0] for d in dims)
    stride = tuple(d[1] for d in dims)
    ref = TensorRef(StorageRef("0", torch.float32, numel, "cpu"), offset, shape, stride, torch.float32)
    accepted = tensor_problem(ref, numel, 1 << 32) is None
    try:
        torch.empty(numel).as_strided(shape, stride, offset)  # checks the view against the storage
        torch_accepts = True
    except RuntimeError:
        torch_accepts = False
    assert accepted == torch_accepts


# -- writing back ------------------------------------------------------------------------------


def storage_bytes_mask(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every byte the writer may change: storage data and CRC-32 fields."""
    archive = open_archive(path)
    ranges = [(s.offset, s.offset + s.nbytes) for s in archive.spans.values()]
    for crc in archive.crcs.values():
        ranges += [(o, o + 4) for o in (crc.central, crc.descriptor, crc.local) if o is not None]
    return ranges


def assert_only_storages_changed(before: Path, after: Path) -> None:
    a, b = before.read_bytes(), after.read_bytes()
    assert len(a) == len(b)
    keep = bytearray(b"\x01") * len(a)
    for start, end in storage_bytes_mask(before):
        keep[start:end] = bytes(end - start)
    assert all(x == y for x, y, k in zip(a, b, keep, strict=True) if k), "a byte outside the storages changed"


def test_write_like_keeps_the_program_and_handles_views_and_ties(tmp_path):
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    net[1].weight = net[0].weight
    net.register_buffer("t", torch.randn(4, 5).t())  # strided
    torch.save(net, tmp_path / "in.pt")
    new = {k: torch.full_like(v, float(i)) if v.is_floating_point() else v for i, (k, v) in enumerate(net.state_dict().items())}
    new["1.weight"] = new["0.weight"]  # tied tensors: one value
    write_like(tmp_path / "in.pt", new.items(), tmp_path / "out.pt")
    assert zipfile.ZipFile(tmp_path / "out.pt").testzip() is None  # every CRC-32 right
    loaded = torch.load(tmp_path / "out.pt", weights_only=False)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, new[k]), k
    assert loaded[1].weight is loaded[0].weight  # still tied
    assert_only_storages_changed(tmp_path / "in.pt", tmp_path / "out.pt")
    new["1.weight"] = new["0.weight"] + 1  # a tie given two values: refused, not silently one
    with pytest.raises(CheckpointError, match="shares its storage with another tensor"):
        write_like(tmp_path / "in.pt", new.items(), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"tensor '0.bias': output tensor of \[3\] float16"):
        write_like(tmp_path / "in.pt", [("0.bias", torch.zeros(3, dtype=torch.float16))], tmp_path / "bad.pt")


def run_cli(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_quantize_merge_and_export_from_the_paper_layout_write_its_format(layout, tmp_path):
    """The official evaluation code's torch.load reads tvq's merged model as it reads zeroshot.pt."""
    root = layout["dir"]
    pack = tmp_path / "pack"
    run_cli("quantize", "-p", root / "zeroshot.pt", "--tasks-from", root, "-o", pack, "--bits", 4, "--no-progress")
    run_cli("quantize", "-p", root, "-f", f"Cars={root / 'Cars'}", "-o", tmp_path / "one", "--bits", 4, "--no-progress")
    for out in ("merged.pt", "merged.safetensors"):
        run_cli("merge", "--pack", pack, "-p", root / "zeroshot.pt", "--method", "task_arithmetic", "--out", tmp_path / out, "--no-progress")
    expected = load_file(tmp_path / "merged.safetensors")
    assert_only_storages_changed(root / "zeroshot.pt", tmp_path / "merged.pt")
    run_cli("export", pack, "--task", "DTD", "--model", "-p", root / "zeroshot.pt", "-o", tmp_path / "dtd.pt", "--no-progress")
    run_cli("export", pack, "--task", "DTD", "--model", "-p", root / "zeroshot.pt", "-o", tmp_path / "dtd.safetensors", "--no-progress")
    with importable(layout["classes"], layout["module"]):
        merged = torch.load(tmp_path / "merged.pt", weights_only=False)  # what the paper's code does
        dtd = torch.load(tmp_path / "dtd.pt", weights_only=False)
    assert type(merged).__name__ == "ImageEncoder" and merged.train_preprocess is merged.val_preprocess
    state = merged.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert not torch.equal(state["model.visual.blocks.0.mlp.0.weight"], layout["states"]["zeroshot"]["model.visual.blocks.0.mlp.0.weight"])
    for key, value in load_file(tmp_path / "dtd.safetensors").items():
        assert torch.equal(dtd.state_dict()[key], value), key
    assert_only_storages_changed(root / "zeroshot.pt", tmp_path / "dtd.pt")
    assert_same_state(open_checkpoint(tmp_path / "merged.pt"), dict(expected))  # and tvq reads its own output back
    # merging the checkpoints themselves, found the same way
    run_cli("merge", "--tasks-from", root, "-p", root, "--method", "task_arithmetic", "--out", tmp_path / "fp32.safetensors", "--no-progress")
    assert set(load_file(tmp_path / "fp32.safetensors")) == set(expected)


def test_tasks_from_lists_task_folders_and_refuses_what_leads_out(tmp_path):
    root = tmp_path / "ViT-B-32"
    for task in ("SVHN", "Cars", "notes"):
        (root / task).mkdir(parents=True)
    for task in ("SVHN", "Cars"):
        (root / task / "finetuned.pt").write_bytes(b"x")
    assert task_folders(root) == {"Cars": root / "Cars", "SVHN": root / "SVHN"}
    with pytest.raises(ConfigError, match="'Cars' is also given with --finetuned"):
        with_task_folders({"Cars": tmp_path}, root)
    with pytest.raises(CheckpointError, match="no task folder holding finetuned.pt"):
        task_folders(root / "notes")
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(b"x")
    (root / "Evil").mkdir()
    (root / "Evil" / "finetuned.pt").symlink_to(outside)
    with pytest.raises(CheckpointError, match="leads outside"):
        task_folders(root)


def test_paper_key_rule_stores_a_tensor_no_task_changed_as_a_constant(layout, tmp_path):
    root = layout["dir"]
    tasks = {t: root / t for t in ("Cars", "DTD")}
    key = "model.token_embedding.weight"  # frozen in every task: τ = 0; kept raw by the paper's rule
    quantize(root / "zeroshot.pt", tasks, tmp_path / "paper", QuantizeOptions(bits=4, key_rule=KeyRule.PAPER), progress=False)
    quantize(root / "zeroshot.pt", tasks, tmp_path / "ndim", QuantizeOptions(bits=4), progress=False)
    paper, ndim = open_pack(tmp_path / "paper"), open_pack(tmp_path / "ndim")
    for pack in (paper, ndim):
        entry = pack.manifest.files[pack.manifest.tasks[0].file].tensors[key]
        assert entry.kind == "const" and entry.value == 0.0 and entry.stored_bytes == 0
        assert torch.equal(pack.task_tensor("Cars", key), torch.zeros(12, 8))
    bias = "model.visual.blocks.0.mlp.0.bias"  # kept raw, changed by the tasks: exactly as before
    entry = paper.manifest.files[paper.manifest.tasks[0].file].tensors[bias]
    assert entry.kind == "raw"
    assert torch.equal(paper.task_tensor("Cars", bias), layout["states"]["Cars"][bias] - layout["states"]["zeroshot"][bias])


@pytest.mark.parametrize(
    "program",
    [
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b.",  # slot state
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x07\x00\x00\x00__doc__K\x01sb.",  # dict state
        b"\x80\x02ccollections\nOrderedDict\n}X\x07\x00\x00\x00__doc__K\x01sb.",
    ],
)
def test_build_cannot_change_the_allowlisted_functions(program):
    with pytest.raises(pickle.UnpicklingError, match="BUILD on an allowlisted function"):
        load_program(program)
    rebuilt = load_program(program_of({"w": _Tensor(_Storage(("storage", torch.FloatStorage, "0", "cpu", 4)), 0, (4,), (1,))}))
    assert isinstance(rebuilt["w"], TensorRef) and rebuilt["w"].shape == (4,)  # later loads see the same functions


OPCODES = [b"(", b")", b"]", b"}", b"N", b"\x88", b"t", b"l", b"d", b"s", b"u", b"a", b"e", b"b", b"R", b"\x81", b"\x85", b"\x86",
           b"\x87", b"0", b"2", b"1", b"K\x01", b"K\x00", b"q\x00", b"h\x00", b"X\x01\x00\x00\x00a", b"Q", b"\x8f", b"\x90", b"\x91",
           b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n", b"cx.y\nZ\n", b"ctorch\nFloatStorage\n",
           b"c__builtin__\nset\n", b"ctorch\nSize\n", b"c_codecs\nencode\n", b"\x94", b"\x93"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(body=st.lists(st.sampled_from(OPCODES) | st.binary(max_size=3), max_size=40))
def test_any_program_is_read_or_refused_in_one_line(tmp_path_factory, body):
    """Programs of real opcodes in any order: a CheckpointError line or a reader, nothing else."""
    path = write_zip(tmp_path_factory.mktemp("fuzz") / "f.pt", b"\x80\x02" + b"".join(body) + b".", {"0": bytes(16)})
    try:
        reader = TorchPickleReader(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))
    else:
        for key in reader:
            reader.get(key)


def test_a_memo_index_that_would_fill_memory_is_refused(tmp_path):
    """CPython sizes its memo table by the largest index: LONG_BINPUT 2**31 alone would fill 32 GiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for index in (1 << 31, 1 << 25):
        program = b"\x80\x02N" + b"r" + struct.pack("<I", index) + b"."
        with pytest.raises(pickle.UnpicklingError, match="memo index"):
            load_program(program)
        with pytest.raises(CheckpointError, match=r"hand\.pt: not a readable torch file \(UnpicklingError: memo index"):
            TorchPickleReader(write_zip(tmp_path / "hand.pt", program, {}))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB: nothing near 512 MiB


def test_a_legacy_length_field_of_an_exabyte_allocates_nothing(tmp_path):
    path = tmp_path / "legacy.pt"
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    path.write_bytes(head + b"\x80\x04\x8e" + (1 << 60).to_bytes(8, "little") + b"abc.")
    with pytest.raises(CheckpointError, match=r"legacy\.pt: not a readable torch file"):
        TorchPickleReader(path)


def test_a_module_shared_at_every_level_is_refused_not_walked_forever(tmp_path, monkeypatch):
    """2**40 paths through 40 modules: state_dict() would never end; the walk stops at a cap."""
    leaf = torch.nn.Linear(1, 1)
    for _ in range(40):
        node = torch.nn.Module()
        node.a = leaf
        node.b = leaf
        leaf = node
    torch.save(leaf, tmp_path / "dag.pt")
    assert (tmp_path / "dag.pt").stat().st_size < 1 << 20
    monkeypatch.setattr(module_state, "MAX_KEYS", 5000)
    with pytest.raises(CheckpointError, match=r"dag\.pt: names more than 5000"):
        TorchPickleReader(tmp_path / "dag.pt")


@pytest.mark.parametrize("legacy", [False, True])
def test_a_plain_state_dict_file_is_written_back_as_one(tmp_path, legacy):
    sd = {"w": torch.randn(3, 4), "b": torch.randn(4).half(), "steps": torch.tensor(7)}
    torch.save(sd, tmp_path / "sd.pt", _use_new_zipfile_serialization=not legacy)
    reader = open_checkpoint(tmp_path / "sd.pt")  # weights_only: a state dict needs no restricted reading
    new = {k: (v * 2 if v.is_floating_point() else v) for k, v in sd.items()}
    assert pickle_template(reader, tmp_path / "out.pt") == tmp_path / "sd.pt"
    assert pickle_template(reader, tmp_path / "out.safetensors") is None
    write_like(tmp_path / "sd.pt", new.items(), tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(loaded) == list(new) and all(torch.equal(loaded[k], new[k]) and loaded[k].dtype == new[k].dtype for k in new)
    with pytest.raises(ConfigError, match="keeps its dtypes"):
        write_like(tmp_path / "sd.pt", new.items(), tmp_path / "out2.pt", torch.bfloat16)
