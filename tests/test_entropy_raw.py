"""Entropy-coded exactly stored (raw) tensors (format 4): bit-shuffled zstd blocks that decode to
the tensor's own bytes, every dtype and shape; the pack reader hands out the same tensors (whole,
by blocks, merged); a stranger's coded raw entries and streams are refused in one line; packs of
versions 2 and 3 read and grow unchanged."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from safetensors.torch import load_file, save_file

from test_entropy_pack import _resign_tensor  # one way to re-sign a tampered tensor
from tvq import QuantizeOptions, open_pack, quantize
from tvq.encode.incremental import add_tasks
from tvq.errors import PackError
from tvq.io.dtypes import TORCH_DTYPES
from tvq.merge import load_task_vectors
from tvq.merge.engine import merge_state_dict
from tvq.pack.manifest import manifest_checksum
from tvq.quant import stored as stored_module
from tvq.quant.entropy import (
    MIN_BLOCK,
    StreamError,
    bitshuffle,
    decode_raw_bytes,
    encode_raw_bytes,
    unbitshuffle,
)
from tvq.report import pack_summary

from conftest import laplace


def _reference_bitshuffle(data: np.ndarray, itemsize: int) -> np.ndarray:
    """The documented layout, spelled out with unpackbits: bit planes of the first m8 elements, the rest as is."""
    m = data.size // itemsize
    m8 = m - m % 8
    bits = np.unpackbits(data[: m8 * itemsize].reshape(m8, itemsize), axis=1, bitorder="little")  # element, 8p + b
    return np.concatenate([np.packbits(bits.T, axis=1, bitorder="little").reshape(-1), data[m8 * itemsize :]])


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("m", [0, 1, 7, 8, 9, 16, 1000, 1003])
def test_bitshuffle_is_the_documented_layout_and_inverts(itemsize: int, m: int) -> None:
    data = np.random.default_rng(m * 10 + itemsize).integers(0, 256, m * itemsize, dtype=np.uint8)
    before = data.copy()
    shuffled = bitshuffle(data, itemsize)
    assert np.array_equal(data, before)  # the input is left alone
    assert np.array_equal(shuffled, _reference_bitshuffle(data, itemsize))
    assert np.array_equal(unbitshuffle(shuffled, itemsize), data)


def _sample(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) < 0.1
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 1e-3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), (n,), generator=g).to(dtype)


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()), ids=list(TORCH_DTYPES))
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 0), (7,), (384,), (33, 65), (MIN_BLOCK + 3,), (2, 3, 4, 5)])
def test_raw_bytes_round_trip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(dtype, math.prod(shape), sum(shape)).reshape(shape)
    stream, coded = encode_raw_bytes(t, block=MIN_BLOCK)  # small blocks: several frames, a short last one
    total = t.numel() * t.element_size()
    assert coded.filter == "bitshuffle" and len(coded.blocks) == -(-total // MIN_BLOCK) and sum(coded.blocks) == stream.numel()
    out = decode_raw_bytes(stream, coded.blocks, coded.block, total, t.element_size())
    assert out.dtype == torch.uint8 and out.numel() == total
    assert torch.equal(out.view(dtype).reshape(shape), t)


@pytest.mark.parametrize("numel", [1 << 18, (1 << 18) + 5])  # one whole 1 MiB block (the strong level), and a second one (the fast level)
def test_full_blocks_decode_within_the_window_limit(numel: int) -> None:
    t = torch.randn(numel, generator=torch.Generator().manual_seed(1)) * 1e-3
    stream, coded = encode_raw_bytes(t)
    assert len(coded.blocks) == (1 if numel == 1 << 18 else 2)
    assert torch.equal(decode_raw_bytes(stream, coded.blocks, coded.block, numel * 4, 4).view(torch.float32), t)


def test_task_vector_deltas_shrink() -> None:
    """fp32 deltas of close weights have zero low mantissa bits and few exponents: the bit planes shrink them."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(4096, generator=g)
    tau = (pre + laplace(pre.shape, 1e-3, g)) - pre
    stream, _ = encode_raw_bytes(tau)
    assert stream.numel() < 0.8 * tau.numel() * 4


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda s, c: (s[:-1], c.blocks[:-1] + [c.blocks[-1] - 1]), "truncated|corrupt"),
        (lambda s, c: (torch.full_like(s, 0x5A), c.blocks), "not a zstd frame|corrupt"),
        (lambda s, c: (s, c.blocks + [1]), "blocks"),
    ],
)
def test_malformed_raw_streams_are_refused(mutate, problem: str) -> None:
    t = torch.randn(5000) * 1e-3
    stream, coded = encode_raw_bytes(t, block=MIN_BLOCK)
    bad, blocks = mutate(stream.clone(), coded)
    with pytest.raises(StreamError, match=problem):
        decode_raw_bytes(bad, blocks, coded.block, t.numel() * 4, 4)


def test_a_raw_frame_declaring_more_than_its_block_is_refused_before_decoding() -> None:
    frame = zstandard.ZstdCompressor().compress(bytes(1 << 24))
    with pytest.raises(StreamError, match="declares 16777216 bytes, expected 4096"):
        decode_raw_bytes(torch.frombuffer(bytearray(frame), dtype=torch.uint8), [len(frame)], MIN_BLOCK, MIN_BLOCK, 4)


# ---- packs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small model whose biases and norms (kept exactly) are large enough for coding to pay."""
    tmp = tmp_path_factory.mktemp("raw")
    g = torch.Generator().manual_seed(3)
    shapes = {"layer.0.weight": (256, 128), "layer.0.bias": (256,), "norm.weight": (1000,), "layer.1.weight": (128, 64),
              "layer.1.bias": (3,), "head.bias": (5000,)}  # fmt: skip
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    save_file(pre, tmp / "pre.safetensors")
    fts = {}
    for i in range(2):
        fts[f"t{i}"] = tmp / f"t{i}.safetensors"
        save_file({k: v + laplace(v.shape, 0.01 * (i + 1), g) for k, v in pre.items()}, fts[f"t{i}"])
    packs = {}
    for mode in ("auto", "off"):
        packs[mode] = tmp / f"tvq-{mode}"
        quantize(tmp / "pre.safetensors", fts, packs[mode], QuantizeOptions(bits=2, entropy=mode), progress=False)  # type: ignore[arg-type]
    return {"dir": tmp, "pre": tmp / "pre.safetensors", "fts": fts, "packs": packs}


def _manifest(pack: Path) -> dict:
    return json.loads((pack / "manifest.json").read_text())


def _raw_entries(m: dict) -> list[tuple[str, str, dict]]:
    return [(rel, k, e) for rel, f in m["files"].items() for k, e in f["tensors"].items() if e["kind"] == "raw"]


def test_coded_raw_tensors_decode_to_the_same_tensors(model: dict) -> None:
    on, off = model["packs"]["auto"], model["packs"]["off"]
    m = _manifest(on)
    assert m["version"] == 4 and _manifest(off)["version"] == 2
    coded = [(rel, k, e) for rel, k, e in _raw_entries(m) if "entropy" in e]
    assert {k for _, k, _ in coded} == {"layer.0.bias", "norm.weight", "head.bias"}  # layer.1.bias (12 bytes) does not pay
    for _, _, e in coded:
        assert e["entropy"]["filter"] == "bitshuffle" and e["dtype"] == "float32"
        assert e["nbytes"] == sum(e["entropy"]["blocks"]) < math.prod(e["shape"]) * 4
    p_on, p_off = open_pack(on), open_pack(off)
    p_on.verify()
    for task in p_on.tasks:
        for key in p_on.keys:
            a, b = p_on.task_tensor(task, key), p_off.task_tensor(task, key)
            assert a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes(), key
            blocks = p_on.task_blocks(task, key)
            if p_on.entry(task, key).kind == "raw":
                assert blocks is not None
                n = a.numel()
                parts = [blocks.read(s, min(s + 96, n)) for s in range(0, n, 96)]
                assert torch.equal(torch.cat(parts), a.reshape(-1)), key  # type: ignore[arg-type]


def test_coded_raw_reads_only_its_own_bytes(model: dict) -> None:
    """A coded raw tensor of one task decodes alone; its file's size and sha256 checks stay."""
    pack = open_pack(model["packs"]["auto"])
    entry = pack.entry("t1", "head.bias")
    assert entry.kind == "raw" and entry.entropy is not None
    meta = pack._handle(pack.manifest.task("t1").file).metas["head.bias"]
    assert meta.dtype == torch.uint8 and list(meta.shape) == [entry.nbytes]  # any safetensors reader sees the coded bytes
    assert pack.task_tensor("t1", "head.bias").dtype == torch.float32


@pytest.mark.parametrize(("method", "options"), [("task_arithmetic", {}), ("ties", {"scope": "tensor"})])
def test_merges_from_coded_and_plain_packs_are_byte_identical(model: dict, method: str, options: dict) -> None:
    merged = []
    for mode in ("auto", "off"):
        pre, vectors = load_task_vectors(model["pre"], packs=[model["packs"][mode]])
        merged.append(merge_state_dict(method, pre, vectors, options))
    for key in merged[0]:
        assert merged[0][key].numpy().tobytes() == merged[1][key].numpy().tobytes(), key


def test_info_counts_bytes_on_disk(model: dict) -> None:
    on, off = (pack_summary(model["packs"][m]) for m in ("auto", "off"))
    files = [f for f in model["packs"]["auto"].rglob("*") if f.is_file() and f.name != "README.md"]
    assert on["total_bytes"] == sum(f.stat().st_size for f in files)
    e = on["entropy"]
    assert e["raw_coded_tensors"] == 3 * 2 and e["raw_tensors"] == 4 * 2
    assert e["raw_plain_bytes"] == off["entropy"]["raw_stored_bytes"] and 0 < e["raw_saved_bytes"] < e["raw_plain_bytes"]


@pytest.mark.parametrize(("dtype", "target"), [(torch.bfloat16, "finetuned"), (torch.float16, "finetuned"), (torch.float32, "task_vector")])
def test_fq_packs_keep_raw_tensors_in_their_dtype(model: dict, tmp_path: Path, dtype: torch.dtype, target: str) -> None:
    """FQ stores the kept tensors of fine-tuned models as they are (bf16, fp16): coded, they decode to those bytes."""
    pre = {k: v.to(dtype) for k, v in load_file(model["pre"]).items()}
    save_file(pre, tmp_path / "pre.safetensors")
    fts = {}
    for name, path in model["fts"].items():
        fts[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(path).items()}, fts[name])
    packs = {}
    for mode in ("auto", "off"):
        packs[mode] = tmp_path / mode
        quantize(tmp_path / "pre.safetensors", fts, packs[mode], QuantizeOptions(bits=4, target=target, entropy=mode), progress=False)  # type: ignore[arg-type]
    coded = [e for _, _, e in _raw_entries(_manifest(packs["auto"])) if "entropy" in e]
    assert coded and all(e["dtype"] == ("float32" if target == "task_vector" else TORCH_DTYPES_NAME[dtype]) for e in coded)
    p_on, p_off = open_pack(packs["auto"], tmp_path / "pre.safetensors"), open_pack(packs["off"], tmp_path / "pre.safetensors")
    for rel, key, _ in _raw_entries(_manifest(packs["auto"])):
        a, b = p_on.decode(rel, key), p_off.decode(rel, key)
        assert a.dtype == b.dtype and torch.equal(a, b), key
    for task in p_on.tasks:
        for key in p_on.keys:
            whole = p_on.task_tensor(task, key)
            assert torch.equal(whole, p_off.task_tensor(task, key)), key
            blocks = p_on.task_blocks(task, key)
            if blocks is not None and p_on.entry(task, key).kind == "raw":  # FQ: θ̂_t − θ_pre a block at a time
                n = whole.numel()
                parts = [blocks.read(s, min(s + 1000, n)) for s in range(0, n, 1000)]
                assert torch.equal(torch.cat(parts), whole.reshape(-1)), key  # type: ignore[arg-type]


TORCH_DTYPES_NAME = {v: k for k, v in TORCH_DTYPES.items()}


# ---- a stranger's coded raw entries ---------------------------------------------------------


def _tamper(pack: Path, change) -> None:
    m = _manifest(pack)
    change(m)
    body = {k: v for k, v in m.items() if k != "digest"}
    (pack / "manifest.json").write_text(json.dumps({**body, "digest": manifest_checksum(body)}))


@pytest.fixture
def attacked(model: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model["packs"]["auto"], tmp_path / "attacked"))


def _first_coded_raw(m: dict) -> tuple[str, str, dict]:
    return next((rel, k, e) for rel, k, e in _raw_entries(m) if "entropy" in e and k == "head.bias")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m, e: m.update(version=3), "raw tensors need pack format version 4"),
        (lambda m, e: e["entropy"].pop("filter"), "coded with filter 'bitshuffle', got None"),
        (lambda m, e: e["entropy"].update(filter="byteshuffle"), "filter"),
        (lambda m, e: e["entropy"].update(block=6000), "power of two"),
        (lambda m, e: e["entropy"].update(block=1 << 30), "power of two"),
        (lambda m, e: e["entropy"].update(blocks=[*e["entropy"]["blocks"], 1]), "blocks for"),
        (lambda m, e: e["entropy"].update(blocks=[e["entropy"]["blocks"][0] + 1]), "sum to nbytes"),
        (lambda m, e: e.update(nbytes=math.prod(e["shape"]) * 4), "fewer than the"),
        (lambda m, e: [e.update(nbytes=0), e["entropy"].update(blocks=[0])], "coded data takes 1 to"),
        (lambda m, e: e.update(dtype="float64"), None),  # 8-byte elements: still a valid record, decoding decides
        (lambda m, e: e.update(dtype="float128"), "unknown dtype"),
        (lambda m, e: e["entropy"].update(level=19), "Extra inputs"),
    ],
)
def test_coded_raw_entries_are_validated_when_read(attacked: Path, change, problem: str | None) -> None:
    _tamper(attacked, lambda m: change(m, _first_coded_raw(m)[2]))
    if problem is None:
        pack = open_pack(attacked)
        rel, key, _ = _first_coded_raw(_manifest(attacked))
        with pytest.raises(PackError, match="malformed entropy-coded stream") as err:
            pack.decode(rel, key)
        assert "\n" not in str(err.value)
        return
    with pytest.raises(PackError, match=problem) as err:
        open_pack(attacked)
    assert "\n" not in str(err.value) and "manifest" in str(err.value) and "head.bias" in str(err.value)


@pytest.mark.parametrize("attack", ["garbage", "truncated", "bomb", "flipped"])
def test_malformed_raw_streams_are_one_line_errors_naming_file_and_tensor(attacked: Path, attack: str) -> None:
    rel, key, entry = _first_coded_raw(_manifest(attacked))
    stream = load_file(attacked / rel)[key]
    if attack == "garbage":
        bad = torch.full_like(stream, 0x5A)
    elif attack == "truncated":
        bad = stream[:-2].clone()
    elif attack == "flipped":  # a literal byte changed: decodes, to other values, or fails; never silently
        bad = stream.clone()
        bad[-3] ^= 0xFF
    else:  # a frame claiming far more bytes than its block
        frame = zstandard.ZstdCompressor().compress(bytes(1 << 24))
        bad = torch.frombuffer(bytearray(frame[: min(len(frame), entry["nbytes"])]), dtype=torch.uint8).clone()
    _resign_tensor(attacked, rel, key, bad)
    pack = open_pack(attacked)
    task = next(t.name for t in pack.manifest.tasks if t.file == rel)
    try:
        value = pack.decode(rel, key)
    except PackError as exc:
        assert "malformed entropy-coded stream" in str(exc) or "NaN" in str(exc)
        assert rel in str(exc) and key in str(exc) and "\n" not in str(exc)
    else:
        assert attack == "flipped" and value.shape == (5000,)
        return
    blocks = pack.task_blocks(task, key)
    assert blocks is not None
    with pytest.raises(PackError, match=key):
        blocks.read(0, 5000)


def test_a_tampered_coded_raw_tensor_fails_its_checksum(attacked: Path) -> None:
    rel, key, _ = _first_coded_raw(_manifest(attacked))
    data = bytearray((attacked / rel).read_bytes())
    data[-1] ^= 1  # the last stored tensor's last byte (the file is re-signed: only the tensor's sha256 can tell)
    (attacked / rel).write_bytes(bytes(data))
    _tamper(attacked, lambda m: m["files"][rel].update(sha256=hashlib.sha256(bytes(data)).hexdigest()))
    pack = open_pack(attacked)
    failures = 0
    for k in pack.manifest.files[rel].tensors:
        try:
            pack.decode(rel, k)
        except PackError as exc:
            assert "checksum mismatch" in str(exc)
            failures += 1
    assert failures == 1


# ---- older packs ----------------------------------------------------------------------------


def _version3_pack(model: dict, out: Path) -> Path:
    """A pack as tvq before format 4 wrote it: codes coded, raw tensors as they are."""
    original = stored_module.StoredTensor.entropy_coded

    def codes_only(self, strong=False):  # type: ignore[no-untyped-def]
        return self if self.kind == "raw" else original(self, strong)

    stored_module.StoredTensor.entropy_coded = codes_only  # type: ignore[method-assign]
    try:
        quantize(model["pre"], {"t0": model["fts"]["t0"]}, out, QuantizeOptions(bits=2), progress=False)
    finally:
        stored_module.StoredTensor.entropy_coded = original  # type: ignore[method-assign]
    return out


def test_version3_packs_read_and_grow(model: dict, tmp_path: Path) -> None:
    """A version-3 pack (coded codes, plain raw tensors) reads as before; a task added to it is
    coded like a new pack's, raw tensors included, and the pack becomes version 4."""
    pack_path = _version3_pack(model, tmp_path / "v3")
    m = _manifest(pack_path)
    assert m["version"] == 3 and not any("entropy" in e for _, _, e in _raw_entries(m))
    pack = open_pack(pack_path)
    off = open_pack(model["packs"]["off"])
    for key in pack.keys:
        assert torch.equal(pack.task_tensor("t0", key), off.task_tensor("t0", key)), key
    add_tasks(pack_path, {"t1": model["fts"]["t1"]}, pretrained=model["pre"], progress=False)
    m = _manifest(pack_path)
    assert m["version"] == 4
    added = m["files"][m["tasks"][1]["file"]]["tensors"]
    assert "entropy" in added["head.bias"] and "entropy" not in m["files"][m["tasks"][0]["file"]]["tensors"]["head.bias"]
    grown = open_pack(pack_path)
    grown.verify()
    for key in grown.keys:
        assert torch.equal(grown.task_tensor("t1", key), off.task_tensor("t1", key)), key
