"""A stranger's entropy-coded raw tensors (format 4), fuzzed: a re-signed pack whose coded raw
stream or record was changed at random decodes to a tensor of the recorded dtype and shape, finite,
or fails with one line naming the file and the tensor; nothing is allocated beyond what the
manifest's shape allows (frames are checked before they are decoded)."""

from __future__ import annotations

import hashlib
import resource
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tvq import QuantizeOptions, quantize
from tvq.errors import PackError
from tvq.io.safetensors_writer import sha256_tensor
from tvq.pack.reader import open_pack

from attack import read_manifest_json, write_manifest_json
from conftest import laplace

KEY = "norm.weight"


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coded-raw")
    g = torch.Generator().manual_seed(5)
    pre = {"layer.weight": torch.randn(64, 64, generator=g), KEY: torch.randn(6000, generator=g)}
    save_file(pre, root / "pre.safetensors")
    save_file({k: v + laplace(v.shape, 0.01, g) for k, v in pre.items()}, root / "t.safetensors")
    quantize(root / "pre.safetensors", {"t": root / "t.safetensors"}, root / "p", QuantizeOptions(bits=2), progress=False)
    entry = read_manifest_json(root / "p")["files"]["tasks/000-t.safetensors"]["tensors"][KEY]
    assert entry["kind"] == "raw" and entry["entropy"]["filter"] == "bitshuffle"
    return root / "p"


def _store(pack: Path, data: torch.Tensor, change_record) -> None:  # type: ignore[no-untyped-def]
    rel = "tasks/000-t.safetensors"
    tensors = load_file(pack / rel)
    tensors[KEY] = data
    save_file(tensors, pack / rel)
    raw = (pack / rel).read_bytes()
    m = read_manifest_json(pack)
    m["files"][rel].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    e = m["files"][rel]["tensors"][KEY]
    e.update(sha256=sha256_tensor(data), nbytes=data.numel())
    e["entropy"]["blocks"][-1] += data.numel() - sum(e["entropy"]["blocks"])
    change_record(e)
    write_manifest_json(pack, m)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
@given(st.data())
def test_random_coded_raw_streams_decode_right_or_fail_in_one_line(pack: Path, data: st.DataObject) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(pack, Path(tmp) / "p"))
        stream = load_file(copy / "tasks/000-t.safetensors")[KEY]
        bad = stream.clone()
        for _ in range(data.draw(st.integers(1, 4))):
            bad[data.draw(st.integers(0, bad.numel() - 1))] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            bad = bad[: data.draw(st.integers(1, bad.numel()))].clone()
        block = data.draw(st.sampled_from([None, 1 << 12, 1 << 13, 1 << 26]))
        _store(copy, bad, lambda e: e["entropy"].update(block=block) if block else None)
        try:
            p = open_pack(copy)
            value = p.task_tensor("t", KEY)
        except PackError as exc:
            assert "\n" not in str(exc) and (KEY in str(exc) or "manifest" in str(exc)), str(exc)
        else:
            assert value.shape == (6000,) and value.dtype == torch.float32 and bool(torch.isfinite(value).all())
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 1 << 30
