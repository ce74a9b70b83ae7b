"""EMR unified packs from strangers: checksums on every tensor and metadata validated on open.

A unified pack is written once with the CLI, then each test rewrites a copy of it (header,
metadata, tensor bytes) the way an attacker or a bad disk could. Metadata edits recompute
the digest, so the deeper validation is what must catch them. Every refusal is exit 2, one
``error:`` line naming the file (and tensor) and the problem, and no output at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tvq.cli import app
from tvq.errors import TvqError
from tvq.merge import emr_task_model, load_task_vectors, merge_state_dict, open_emr
from tvq.pack.manifest import manifest_checksum

from attack import one_line_refusal
from conftest import finetune, make_model

runner = CliRunner()
KEY = "encoder.layer.0.attn.weight"  # [16, 12]: 192 elements, masks [3, 24]
Tensors = dict[str, list[Any]]  # name -> [dtype, shape, raw bytes], in file order


def run(*args: object) -> Any:
    return runner.invoke(app, ["merge", *map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def emr(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pretrained + 3 fine-tuned safetensors, and their unified pack written by ``tvq merge``."""
    root = tmp_path_factory.mktemp("emr")
    pre = make_model(0)
    save_file(pre, root / "pre.safetensors")
    args: list[object] = []
    for i in range(3):
        save_file(finetune(pre, i), root / f"task{i}.safetensors")
        args += ["-f", f"task{i}={root / f'task{i}.safetensors'}"]
    result = run("--method", "emr", "--pretrained", root / "pre.safetensors", *args, "--out", root / "emr.safetensors")
    assert result.exit_code == 0, result.output
    return {"root": root, "pre": root / "pre.safetensors", "unified": root / "emr.safetensors"}


@pytest.fixture
def copy(emr: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the unified pack to tamper with."""
    return Path(shutil.copy(emr["unified"], tmp_path / "emr.safetensors"))


# -- rewriting a safetensors file ---------------------------------------------------------
def load_raw(path: Path) -> tuple[dict[str, str], Tensors]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    tensors: Tensors = {}
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        start, end = header[name]["data_offsets"]
        tensors[name] = [header[name]["dtype"], header[name]["shape"], raw[8 + n + start : 8 + n + end]]
    return meta, tensors


def save_raw(path: Path, meta: dict[str, str], tensors: Tensors) -> None:
    header: dict[str, Any] = {}
    at = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(data)]}
        at += len(data)
    header["__metadata__"] = meta
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"".join(t[2] for t in tensors.values()))


def reseal(meta: dict[str, str]) -> None:
    """Recompute the metadata digest, as a careful attacker would (when the JSON parses)."""
    if "digest" not in meta:
        return
    try:
        tasks, tensors = json.loads(meta["tasks"]), json.loads(meta["tensors"])
        body = {"format": meta["format"], "version": meta["version"], "tasks": tasks, "tensors": tensors}
    except (KeyError, ValueError):
        return
    meta["digest"] = manifest_checksum(body)


def record(meta: dict[str, str], tensors: Tensors, name: str) -> None:
    """Make the metadata's checksum entry of ``name`` describe its (edited) dtype, shape and bytes."""
    sums = json.loads(meta["tensors"])
    dtype, shape, data = tensors[name]
    sums[name] = {"dtype": dtype, "shape": shape, "sha256": hashlib.sha256(data).hexdigest()}
    meta["tensors"] = json.dumps(sums)


def flip_byte(path: Path, name: str) -> None:
    meta, tensors = load_raw(path)
    data = bytearray(tensors[name][2])
    data[len(data) // 2] ^= 0x10
    tensors[name][2] = bytes(data)
    save_raw(path, meta, tensors)


# -- the outcome --------------------------------------------------------------------------
def task_model(emr: dict[str, Path], unified: Path, out: Path, task: str = "task1") -> Any:
    return run("--method", "emr", "--unified", unified, "--task", task, "--pretrained", emr["pre"], "--out", out)


def refused(result: Any, out: Path, *fragments: str) -> None:
    """Exit 2, one ``error:`` line holding every fragment, no traceback, nothing written."""
    one_line_refusal(result, *fragments)
    assert not out.exists() and list(out.parent.iterdir()) == [], list(out.parent.iterdir())


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "m.safetensors"


# -- tests ------------------------------------------------------------------------------
def test_unified_pack_records_a_checksum_per_tensor_and_a_digest(emr, out):
    meta, tensors = load_raw(emr["unified"])
    assert set(meta) == {"format", "version", "tasks", "tensors", "digest"} and meta["version"] == "2"
    sums = json.loads(meta["tensors"])
    assert set(sums) == set(tensors) and len(tensors) == 2 * 13 + 1  # unified + masks of 13 float tensors, rescalers
    for name, (dtype, shape, data) in tensors.items():
        assert sums[name] == {"dtype": dtype, "shape": shape, "sha256": hashlib.sha256(data).hexdigest()}
    assert meta["digest"] == manifest_checksum({"format": "tvq-emr", "version": "2", "tasks": ["task0", "task1", "task2"], "tensors": sums})
    result = task_model(emr, emr["unified"], out)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    pre, vectors = load_task_vectors(emr["pre"], finetuned={f"task{i}": emr["root"] / f"task{i}.safetensors" for i in range(3)})
    direct = merge_state_dict("emr", pre, vectors, task="task1")
    written = load_file(out)
    assert written.keys() == direct.keys()
    for key in direct:
        torch.testing.assert_close(written[key], direct[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [f"unified.{KEY}", "masks.encoder.layer.1.mlp.weight", "rescalers"])
def test_a_flipped_byte_is_refused(emr, copy, out, name):
    flip_byte(copy, name)
    refused(task_model(emr, copy, out), out, str(copy), f"tensor '{name}'", "checksum mismatch")


def test_metadata_edited_without_its_digest_is_refused(emr, copy, out):
    meta, tensors = load_raw(copy)
    meta["tasks"] = json.dumps(["task0", "task1", "other"])
    save_raw(copy, meta, tensors)
    refused(task_model(emr, copy, out), out, str(copy), "metadata checksum mismatch")


def test_a_version_1_pack_still_reads_with_one_warning(emr, copy, out, tmp_path):
    meta, tensors = load_raw(copy)
    save_raw(copy, {"format": "tvq-emr", "version": "1", "tasks": meta["tasks"]}, tensors)
    result = task_model(emr, copy, out)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(copy) in warnings[0] and "cannot be verified" in warnings[0], result.output
    expected = tmp_path / "expected.safetensors"
    assert task_model(emr, emr["unified"], expected).exit_code == 0
    assert out.read_bytes() == expected.read_bytes()


def _tasks(value: str) -> Any:
    def edit(meta: dict[str, str], tensors: Tensors) -> None:
        meta["tasks"] = value

    return edit


def _drop(name: str) -> Any:
    def edit(meta: dict[str, str], tensors: Tensors) -> None:
        del tensors[name]
        sums = json.loads(meta["tensors"])
        del sums[name]
        meta["tensors"] = json.dumps(sums)

    return edit


def _nan_rescaler(meta: dict[str, str], tensors: Tensors) -> None:
    tensors["rescalers"][2] = struct.pack("<3f", 1.0, math.nan, 1.0)
    record(meta, tensors, "rescalers")


def _short_mask(meta: dict[str, str], tensors: Tensors) -> None:
    name = f"masks.{KEY}"
    rows = [tensors[name][2][i * 24 : i * 24 + 23] for i in range(3)]
    tensors[name][1:] = [[3, 23], b"".join(rows)]
    record(meta, tensors, name)


def _float_mask(meta: dict[str, str], tensors: Tensors) -> None:
    name = f"masks.{KEY}"
    tensors[name][:2] = ["F32", [3, 6]]
    record(meta, tensors, name)


def _extra_tensor(meta: dict[str, str], tensors: Tensors) -> None:
    tensors["bogus"] = ["F32", [2], b"\0" * 8]
    record(meta, tensors, "bogus")


def _unrecorded(meta: dict[str, str], tensors: Tensors) -> None:
    sums = json.loads(meta["tensors"])
    del sums[f"unified.{KEY}"]
    meta["tensors"] = json.dumps(sums)


def _reshaped(meta: dict[str, str], tensors: Tensors) -> None:
    tensors[f"unified.{KEY}"][1] = [12, 16]  # same bytes, so only the recorded shape catches it


def _reshaped_and_recorded(meta: dict[str, str], tensors: Tensors) -> None:
    tensors[f"unified.{KEY}"][1] = [12, 16]
    record(meta, tensors, f"unified.{KEY}")


def _bad_sum(meta: dict[str, str], tensors: Tensors) -> None:
    sums = json.loads(meta["tensors"])
    sums[f"masks.{KEY}"]["sha256"] = "not a checksum"
    meta["tensors"] = json.dumps(sums)


def _stats(name: str, dtype: str, shape: list[int], version: str = "3") -> Any:
    """Add a per-task statistics tensor (version 3: BatchNorm models' packs) to the pack."""

    def edit(meta: dict[str, str], tensors: Tensors) -> None:
        meta["version"] = version
        size = math.prod(shape) * {"F32": 4, "F16": 2}[dtype]
        tensors[f"stats.{name}"] = [dtype, shape, b"\0" * size]
        record(meta, tensors, f"stats.{name}")

    return edit


def _meta_key(key: str, value: str | None) -> Any:
    def edit(meta: dict[str, str], tensors: Tensors) -> None:
        if value is None:
            del meta[key]
        else:
            meta[key] = value

    return edit


MALFORMED = {
    "tasks not JSON": (_tasks('["task0", "task1"'), ["'tasks' is not valid JSON"]),
    "tasks a dict": (_tasks('{"task0": 1}'), ["'tasks' must be a JSON list"]),
    "tasks a number": (_tasks("3"), ["'tasks' must be a JSON list"]),
    "tasks NaN": (_tasks("NaN"), ["'tasks' is not valid JSON"]),
    "task twice": (_tasks('["task0", "task0", "task2"]'), ["names a task twice"]),
    "empty task name": (_tasks('["task0", "", "task2"]'), ["task name '' is not"]),
    "task name with a newline": (_tasks('["task0", "a\\nb", "task2"]'), ["task name 'a\\nb' is not"]),
    "too many tasks": (_tasks(json.dumps([f"t{i}" for i in range(5000)])), ["1 to 1024 task names"]),
    "tasks and rescalers disagree": (_tasks('["task0", "task1"]'), ["tensor 'rescalers'", "expected F32 [2]"]),
    "rescalers missing": (_drop("rescalers"), ["tensor 'rescalers': missing"]),
    "mask missing": (_drop(f"masks.{KEY}"), [f"tensor 'masks.{KEY}': missing"]),
    "unified missing": (_drop(f"unified.{KEY}"), [f"tensor 'unified.{KEY}': missing"]),
    "NaN rescaler": (_nan_rescaler, ["tensor 'rescalers'", "finite"]),
    "mask size": (_short_mask, [f"tensor 'masks.{KEY}'", "U8 [3, 23], expected U8 [3, 24]"]),
    "mask dtype": (_float_mask, [f"tensor 'masks.{KEY}'", "F32 [3, 6], expected U8 [3, 24]"]),
    "unknown tensor": (_extra_tensor, ["unknown tensor 'bogus'"]),
    "tensor without checksum": (_unrecorded, [f"tensor 'unified.{KEY}': no checksum recorded"]),
    "header reshaped": (_reshaped, [f"tensor 'unified.{KEY}'", "header says F32 [12, 16]", "[16, 12]"]),
    "pack and pretrained disagree": (_reshaped_and_recorded, [f"tensor 'unified.{KEY}'", "differs from the pretrained"]),
    "tensors not a map": (_meta_key("tensors", "[1, 2]"), ["'tensors' must be a JSON object"]),
    "checksum not hex": (_bad_sum, [f"'tensors' entry 'masks.{KEY}' must hold dtype, shape, sha256"]),
    "unknown metadata key": (_meta_key("extra", "1"), ["key 'extra' is unknown"]),
    "digest missing": (_meta_key("digest", None), ["key 'digest' is missing"]),
    "unknown version": (_meta_key("version", "4"), ["version '4' is not supported"]),
    "not an EMR pack": (_meta_key("format", "pt"), ["not a tvq EMR pack"]),
    "statistics in version 2": (_stats("bn.running_var", "F32", [3, 8], "2"), ["unknown tensor 'stats.bn.running_var'"]),
    "statistics of a merged tensor": (_stats(KEY, "F32", [3, 16, 12]), [f"tensor 'stats.{KEY}'", "both as a statistic and as a merged"]),
    "statistics of 2 tasks": (_stats("bn.running_var", "F32", [2, 8]), ["tensor 'stats.bn.running_var'", "[2, 8] is not [3, ...]"]),
    "statistics in fp16": (_stats("bn.running_var", "F16", [3, 8]), ["tensor 'stats.bn.running_var'", "F16 [3, 8], expected F32 [3, 8]"]),
    "statistics of no tensor": (_stats("bn.running_var", "F32", [3, 8]), ["tensor 'stats.bn.running_var': not a float tensor of the pretrained"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_metadata_is_one_line(emr, copy, out, case):
    edit, fragments = MALFORMED[case]
    meta, tensors = load_raw(copy)
    edit(meta, tensors)
    reseal(meta)
    save_raw(copy, meta, tensors)
    refused(task_model(emr, copy, out), out, str(copy), *fragments)


def test_an_unknown_task_lists_the_tasks(emr, out):
    refused(task_model(emr, emr["unified"], out, task="nope"), out, "'nope' is not in the EMR pack", "task0, task1, task2")


def test_a_truncated_pack_is_one_line(emr, copy, out):
    copy.write_bytes(copy.read_bytes()[:-100])
    refused(task_model(emr, copy, out), out, str(copy))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, ...]:
    """(what, where, value): replace a field, one task, one field of one checksum entry, or the raw text."""
    what = draw(st.sampled_from(["field", "task", "entry", "raw", "extra_key"]))
    field = draw(st.sampled_from(["tasks", "tensors", "version", "format"]))
    return what, field, draw(st.integers(0, 30)), draw(st.sampled_from(["dtype", "shape", "sha256", "*"])), json.dumps(draw(JSON))


def mutate(meta: dict[str, str], mutation: tuple[Any, ...]) -> None:
    what, field, index, part, value = mutation
    if what == "field":
        meta[field] = value
    elif what == "task":
        tasks = json.loads(meta["tasks"])
        tasks[index % len(tasks)] = json.loads(value)
        meta["tasks"] = json.dumps(tasks)
    elif what == "entry":
        sums = json.loads(meta["tensors"])
        name = sorted(sums)[index % len(sums)]
        if part == "*":
            sums[name] = json.loads(value)
        else:
            sums[name][part] = json.loads(value)
        meta["tensors"] = json.dumps(sums)
    elif what == "raw":
        text = meta[field]
        at = index * len(text) // 30
        meta[field] = text[:at] + value[:3] + text[at + 1 :]
    else:
        meta[value[:12]] = field


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations())
def test_random_metadata_edits_fail_cleanly(emr, tmp_path, mutation):
    """Whatever the (resealed) metadata says: a model, or a TvqError and nothing written."""
    unified = tmp_path / "fuzz.safetensors"
    meta, tensors = load_raw(emr["unified"])
    mutate(meta, mutation)
    reseal(meta)
    save_raw(unified, meta, tensors)
    out_dir = tmp_path / "fuzz-out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    try:
        open_emr(unified)
        emr_task_model(unified, emr["pre"], "task1", out_dir / "m.safetensors")
    except TvqError as exc:
        assert "\n" not in str(exc)
        assert list(out_dir.iterdir()) == []
    else:  # only harmless edits get this far (e.g. a task renamed)
        assert [f.name for f in out_dir.iterdir()] == ["m.safetensors"]
