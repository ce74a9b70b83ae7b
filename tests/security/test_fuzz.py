"""Property-based fuzzing of everything a stranger hands tvq: manifests (re-signed, so only the
validation stands in the way), safetensors headers inside packs (file checksums re-signed
too), and shard indexes of model folders. Every failure must be tvq's own one-line error type,
nothing may be written outside the output, nothing decoded may be NaN/Inf, and memory stays
bounded. A short budget runs by default; TVQ_FUZZ_EXAMPLES=2000 runs a long one."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tvq import QuantizeOptions, quantize
from tvq.errors import TvqError
from tvq.export import export_task
from tvq.io.readers import open_checkpoint
from tvq.pack.reader import open_pack

from attack import read_manifest_json, snapshot, write_manifest_json
from conftest import finetune, make_model

EXAMPLES = int(os.environ.get("TVQ_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=EXAMPLES <= 40)
RSS_GROWTH_LIMIT = 1 << 30  # bytes of peak RSS the whole fuzz run may add


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    """One pack of each kind, made once; examples work on copies."""
    root = tmp_path_factory.mktemp("fuzz")
    pre = make_model(0)
    save_file(pre, root / "pre.safetensors")
    fts = {}
    for i in range(2):
        fts[f"t{i}"] = root / f"t{i}.safetensors"
        save_file(finetune(pre, i), fts[f"t{i}"])
    kinds = {
        "tvq": QuantizeOptions(bits=3),
        "rtvq": QuantizeOptions(bits=2, residual=True, error_correction=True),
        "fq": QuantizeOptions(target="finetuned", bits=4),
        "group": QuantizeOptions(bits=2, quantizer="group", group_size=8),
    }
    out = {"pre": root / "pre.safetensors"}
    for name, opts in kinds.items():
        quantize(root / "pre.safetensors", fts, root / name, opts, progress=False)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def rss_bound() -> Iterator[None]:
    start = _peak_rss()
    yield
    assert _peak_rss() - start < RSS_GROWTH_LIMIT


def _paths(value: object, prefix: tuple = ()) -> Iterator[tuple]:
    """Every location in a JSON tree (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            yield from _paths(v, (*prefix, i))


HOSTILE_STRINGS = [
    "../x.safetensors",
    "/etc/hostname",
    "tasks/../../x",
    "..\\x",
    "",
    "a" * 5000,
    "tasks/000-t0.safetensors",
    "base.safetensors",
    "q",
    "raw",
    "const",
    "minmax",
    "group",
    "float32",
    "bfloat16",
    "NaN",
    "\x00",
]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**32 + 1, 10**12, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-45, 3e38, 1e39]),
    st.text(max_size=20),
    st.sampled_from(HOSTILE_STRINGS),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6
)


def _mutate(tree: dict, path: tuple, action: str, value: object) -> None:
    if not path:
        return
    parent = tree
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "delete" and isinstance(parent, dict):
        parent.pop(last, None)
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(parent[last])
    else:
        parent[last] = value


mutations = st.lists(st.tuples(st.integers(min_value=0), st.sampled_from(["set", "set", "delete", "duplicate"]), json_values), min_size=1, max_size=3)


def _exercise(pack: Path, pre: Path, out: Path) -> None:
    """What a user does with a pack: open, read every tensor of every task (dense and as codes),
    verify, export; everything it hands out must be finite."""
    p = open_pack(pack, pre)
    for task in p.tasks:
        for key in p.keys:
            assert bool(torch.isfinite(p.task_tensor(task, key)).all()), (task, key)
            coded = p.coded(task, key)
            if coded is not None:
                assert bool(torch.isfinite(coded.table).all())
    p.verify()
    export_task(pack, p.tasks[0], out, pretrained=pre, model=True, overwrite=True, progress=False)


def _attack(packs: dict[str, Path], kind: str, change) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pack = work / "pack"
        shutil.copytree(packs[kind], pack)
        change(pack)
        out = work / "out" / "model.safetensors"
        (work / "out").mkdir()
        before = snapshot(work, skip=work / "out")
        try:
            _exercise(pack, packs["pre"], out)
        except TvqError as exc:
            assert "\n" not in str(exc).strip(), str(exc)
        assert snapshot(work, skip=work / "out") == before
        assert [f.name for f in (work / "out").iterdir()] in ([], ["model.safetensors"])


@FUZZ
@given(kind=st.sampled_from(["tvq", "rtvq", "fq", "group"]), picks=mutations)
def test_fuzz_manifests(packs, rss_bound, kind, picks):
    def change(pack: Path) -> None:
        m = read_manifest_json(pack)
        for index, action, value in picks:
            locations = list(_paths(m))
            _mutate(m, locations[index % len(locations)], action, value)
        write_manifest_json(pack, m)

    _attack(packs, kind, change)


def _rewrite_header(file: Path, header: dict) -> None:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@FUZZ
@given(kind=st.sampled_from(["tvq", "rtvq", "group"]), picks=mutations)
def test_fuzz_pack_file_headers(packs, rss_bound, kind, picks):
    """A lying safetensors header inside a pack, with the file's size and sha256 re-signed in
    the manifest: only the per-tensor checks stand in the way."""

    def change(pack: Path) -> None:
        m = read_manifest_json(pack)
        rel = m["tasks"][0]["file"]
        file = pack / rel
        data = file.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        for index, action, value in picks:
            locations = list(_paths(header))
            _mutate(header, locations[index % len(locations)], action, value)
        _rewrite_header(file, header)
        new = file.read_bytes()
        m["files"][rel].update(bytes=len(new), sha256=hashlib.sha256(new).hexdigest())
        write_manifest_json(pack, m)

    _attack(packs, kind, change)


@FUZZ
@given(picks=mutations)
def test_fuzz_shard_indexes(packs, rss_bound, picks):
    """A sharded model folder whose index is mutated: every failure is one CheckpointError line,
    and no tensor is read from outside the folder (a bait file sits next to it)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "model"
        folder.mkdir()
        sd = make_model(0)
        keys = sorted(sd)
        half = len(keys) // 2
        save_file({k: sd[k] for k in keys[:half]}, folder / "model-00001-of-00002.safetensors")
        save_file({k: sd[k] for k in keys[half:]}, folder / "model-00002-of-00002.safetensors")
        bait = {k: torch.full_like(v, 7) for k, v in sd.items()}
        save_file(bait, work / "outside.safetensors")
        index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}}
        for i, action, value in picks:
            locations = list(_paths(index))
            _mutate(index, locations[i % len(locations)], action, value)
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        before = snapshot(work)
        try:
            reader = open_checkpoint(folder)
            for key in reader.keys():  # noqa: SIM118 -- a reader, not a dict
                t = reader.get(key)
                assert not (t.numel() and bool((t == 7).all()) and not bool((sd.get(key, t) == 7).all())), key  # never the bait
        except TvqError as exc:
            assert "\n" not in str(exc).strip(), str(exc)
        assert snapshot(work) == before
