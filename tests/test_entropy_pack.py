"""Entropy-coded packs (format 3: codes; 4: also the exactly stored tensors): the same codes, the
same merges, lazy reads, sizes measured on disk, and a stranger's coded entries validated before
anything is read (coded raw tensors in detail: tests/test_entropy_raw.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tvq.pack.reader as pack_reader
from tvq import QuantizeOptions, open_pack, quantize
from tvq.cli import app
from tvq.encode.incremental import add_tasks
from tvq.errors import PackError
from tvq.merge import load_task_vectors
from tvq.merge.engine import merge_state_dict
from tvq.pack.manifest import manifest_checksum
from tvq.quant.packing import packed_nbytes
from tvq.report import pack_summary

from conftest import laplace

OPTIONS = {
    "tvq2": QuantizeOptions(bits=2),
    "tvq3": QuantizeOptions(bits=3),
    "tvq4": QuantizeOptions(bits=4),
    "rtvq-b3o2": QuantizeOptions(bits=2, base_bits=3, residual=True),
    "rtvq-b2o1-ec": QuantizeOptions(bits=1, base_bits=2, residual=True, error_correction=True),
    "group3": QuantizeOptions(bits=3, quantizer="group", group_size=64),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A pretrained model and three fine-tunes with Laplace deltas, with tensors large enough
    that coding pays (conftest's tiny model is smaller than a coded tensor's manifest record)."""
    tmp_path = tmp_path_factory.mktemp("entropy")
    g = torch.Generator().manual_seed(7)
    shapes = {"encoder.layer.0.mlp.weight": (384, 512), "encoder.layer.1.attn.weight": (256, 256), "encoder.layer.2.mlp.weight": (300, 301),
              "encoder.layer.2.mlp.bias": (301,), "embeddings.word_embeddings.weight": (500, 64)}  # fmt: skip
    pre = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    save_file(pre, tmp_path / "pre.safetensors")
    paths = {}
    for i in range(3):
        ft = {k: v if "word_embeddings" in k else v + laplace(v.shape, 0.01 * (i + 1), g) for k, v in pre.items()}
        paths[f"task{i}"] = tmp_path / f"task{i}.safetensors"
        save_file(ft, paths[f"task{i}"])
    return {"dir": tmp_path, "pre_path": tmp_path / "pre.safetensors", "ft_paths": paths, "packs": {}}


@pytest.fixture
def tiny(model: dict, tmp_path: Path) -> dict:
    """The module's model, its packs built once, and a fresh folder for what a test writes."""
    return {**model, "dir": tmp_path}


def read_manifest_json(pack: Path) -> dict:
    return json.loads((pack / "manifest.json").read_text())


def tamper(pack: Path, change) -> None:
    """Change the manifest and re-sign it: its digest proves integrity, not good intent."""
    m = read_manifest_json(pack)
    change(m)
    body = {k: v for k, v in m.items() if k != "digest"}
    (pack / "manifest.json").write_text(json.dumps({**body, "digest": manifest_checksum(body)}))


def _both(tiny: dict, name: str) -> tuple[Path, Path]:
    """The pack of ``name`` with entropy coding on and off, built once per module (copy before changing)."""
    if name in tiny["packs"]:
        return tiny["packs"][name]
    on, off = tiny["ft_paths"]["task0"].parent / f"{name}-on", tiny["ft_paths"]["task0"].parent / f"{name}-off"
    options = OPTIONS[name]
    quantize(tiny["pre_path"], tiny["ft_paths"], on, options, progress=False)
    quantize(tiny["pre_path"], tiny["ft_paths"], off, QuantizeOptions(**{**vars(options), "entropy": "off"}), progress=False)
    tiny["packs"][name] = (on, off)
    return on, off


def _coded_entries(m: dict, kind: str = "q") -> list[dict]:
    return [e for f in m["files"].values() for e in f["tensors"].values() if "entropy" in e and e["kind"] == kind]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_coded_pack_decodes_to_the_same_codes_and_is_smaller(tiny, name):
    on, off = _both(tiny, name)
    m_on, m_off = read_manifest_json(on), read_manifest_json(off)
    assert (m_on["version"], m_off["version"]) == (4, 2)  # off: readable by tvq before format 3
    assert not _coded_entries(m_off) and not _coded_entries(m_off, "raw") and _coded_entries(m_on) and _coded_entries(m_on, "raw")
    for e in _coded_entries(m_on):
        assert e["nbytes"] == sum(e["entropy"]["blocks"]) < packed_nbytes(torch.Size(e["shape"]).numel(), e["bits"])
    p_on, p_off = open_pack(on), open_pack(off)
    p_on.verify()
    for rel, f in p_off.manifest.files.items():
        for key, entry in f.tensors.items():
            if entry.kind == "q":
                assert torch.equal(p_on._codes(rel, key, p_on.manifest.files[rel].tensors[key]), p_off._codes(rel, key, entry)), (rel, key)
            assert torch.equal(p_on.decode(rel, key), p_off.decode(rel, key)), (rel, key)
    s_on, s_off = pack_summary(on), pack_summary(off)
    assert s_on["total_bytes"] < s_off["total_bytes"]
    data = [f for f in on.rglob("*") if f.is_file() and f.name != "README.md"]  # the model card is not pack data
    assert s_on["total_bytes"] == sum(f.stat().st_size for f in data)  # measured on disk
    assert s_on["entropy"]["plain_bytes"] == s_off["entropy"]["stored_bytes"] == s_off["entropy"]["plain_bytes"]
    assert s_on["entropy"]["raw_plain_bytes"] == s_off["entropy"]["raw_stored_bytes"] == s_off["entropy"]["raw_plain_bytes"]
    # what info says was saved is what the files lost (their safetensors headers list smaller offsets)
    headers = 32 * len(list(on.rglob("*.safetensors")))
    saved = s_on["entropy"]["saved_bytes"] + s_on["entropy"]["raw_saved_bytes"]
    assert abs(saved - (s_off["total_bytes"] - s_on["total_bytes"] + _manifest_growth(on, off))) <= headers


def _manifest_growth(on: Path, off: Path) -> int:
    return (on / "manifest.json").stat().st_size - (off / "manifest.json").stat().st_size


@pytest.mark.parametrize("name", ["tvq2", "tvq3", "rtvq-b3o2", "rtvq-b2o1-ec", "group3"])
@pytest.mark.parametrize(("method", "options"), [("task_arithmetic", {}), ("ties", {"scope": "tensor"})])
def test_merges_from_coded_and_plain_packs_are_byte_identical(tiny, name, method, options):
    on, off = _both(tiny, name)
    merged = []
    for pack in (on, off):
        pre, vectors = load_task_vectors(tiny["pre_path"], packs=[pack])
        merged.append(merge_state_dict(method, pre, vectors, options))
    assert merged[0].keys() == merged[1].keys()
    for key in merged[0]:
        assert merged[0][key].dtype == merged[1][key].dtype
        assert merged[0][key].numpy().tobytes() == merged[1][key].numpy().tobytes(), key


def test_one_tensor_of_one_task_reads_only_its_own_bytes(tiny, monkeypatch):
    on, _ = _both(tiny, "rtvq-b3o2")
    reads = []
    original = pack_reader.Pack._read_verified

    def spy(self, rel, name, *args):
        reads.append((Path(rel).name, name))
        return original(self, rel, name, *args)

    monkeypatch.setattr(pack_reader.Pack, "_read_verified", spy)
    pack = open_pack(on)
    key = "encoder.layer.2.mlp.weight"
    assert pack.entry("task2", key).entropy is not None
    pack.task_tensor("task2", key)
    assert sorted(reads) == [("002-task2.safetensors", key), ("base.safetensors", key)]


def test_grown_packs_keep_their_coding_and_version(tiny):
    """A task added to a coded pack is coded; one added to a plain (or older) pack is not, so the
    pack stays readable by the tvq that made it."""
    first = {"task0": tiny["ft_paths"]["task0"]}
    for entropy, version in (("auto", 4), ("off", 2)):
        out = tiny["dir"] / f"grow-{entropy}"
        quantize(tiny["pre_path"], first, out, QuantizeOptions(bits=2, entropy=entropy), progress=False)
        add_tasks(out, {"task1": tiny["ft_paths"]["task1"]}, pretrained=tiny["pre_path"], progress=False)
        m = read_manifest_json(out)
        assert m["version"] == version
        added = m["files"][m["tasks"][1]["file"]]["tensors"].values()
        assert any("entropy" in e for e in added) == (entropy == "auto")


# ---- a stranger's coded entries -------------------------------------------------------------


@pytest.fixture
def coded(tiny) -> Path:
    """A copy of the coded TVQ INT2 pack, to attack."""
    on, _ = _both(tiny, "tvq2")
    return Path(shutil.copytree(on, tiny["dir"] / "attacked"))


def _first_coded(m: dict) -> tuple[str, str, dict]:
    rel = m["tasks"][0]["file"]
    tensors = m["files"][rel]["tensors"]
    key = next(k for k, e in tensors.items() if "entropy" in e and e["kind"] == "q")
    return rel, key, tensors[key]


def _change(change):
    def apply(m: dict) -> None:
        change(m, _first_coded(m)[2])

    return apply


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m, e: m.update(version=2), "need pack format version 3"),
        (lambda m, e: e["entropy"].update(blocks=[*e["entropy"]["blocks"], 1]), "blocks for"),
        (lambda m, e: e["entropy"].update(blocks=[e["entropy"]["blocks"][0] + 1, *e["entropy"]["blocks"][1:]]), "sum to nbytes"),
        (lambda m, e: e["entropy"].update(block=3000), "power of two"),
        (lambda m, e: e["entropy"].update(block=1 << 40), "power of two"),
        (lambda m, e: e.update(nbytes=packed_nbytes(torch.Size(e["shape"]).numel(), e["bits"])), "fewer than the"),
        (lambda m, e: e["entropy"].update(coder="lz4"), "zstd"),
        (lambda m, e: e["entropy"].update(blocks=[True] * len(e["entropy"]["blocks"])), "valid integer"),
        (lambda m, e: e["entropy"].update(extra=1), "Extra inputs"),
        (lambda m, e: [e.update(kind="raw", dtype="float32", bits=None, scheme=None, params={}, aux={})], "coded with filter 'bitshuffle', got None"),
        (lambda m, e: e["entropy"].update(filter="bitshuffle"), "codes are coded byte-aligned, without a filter"),
    ],
)
def test_coded_entries_are_validated_when_read(coded, change, problem):
    tamper(coded, _change(change))
    with pytest.raises(PackError, match=problem) as err:
        open_pack(coded)
    assert "\n" not in str(err.value) and "manifest" in str(err.value)


def _resign_tensor(pack: Path, rel: str, key: str, data: torch.Tensor) -> None:
    """Store ``data`` as the tensor's bytes and re-sign file and manifest, as anyone can."""
    from tvq.io.safetensors_writer import sha256_tensor

    file = pack / rel
    tensors = load_file(file)
    tensors[key] = data
    save_file(tensors, file)
    raw = file.read_bytes()

    def resign(m: dict) -> None:
        m["files"][rel].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
        m["files"][rel]["tensors"][key].update(sha256=sha256_tensor(data), nbytes=data.numel())
        m["files"][rel]["tensors"][key]["entropy"]["blocks"][-1] += data.numel() - sum(m["files"][rel]["tensors"][key]["entropy"]["blocks"])

    tamper(pack, resign)


@pytest.mark.parametrize("attack", ["garbage", "truncated", "bomb"])
def test_malformed_streams_are_one_line_errors_naming_file_and_tensor(tiny, coded, attack):
    import zstandard

    m = read_manifest_json(coded)
    rel, key, entry = _first_coded(m)
    stream = load_file(coded / rel)[key]
    if attack == "garbage":
        bad = torch.full_like(stream, 0x5A)
    elif attack == "truncated":
        bad = stream[:-2].clone()
    else:  # a frame claiming far more bytes than its block
        frame = zstandard.ZstdCompressor().compress(bytes(1 << 24))
        bad = torch.frombuffer(bytearray(frame[: min(len(frame), entry["nbytes"])]), dtype=torch.uint8).clone()
    _resign_tensor(coded, rel, key, bad)
    pack = open_pack(coded)
    with pytest.raises(PackError, match="malformed entropy-coded stream") as err:
        pack.decode(rel, key)
    assert rel in str(err.value) and key in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(app, ["merge", "--pack", str(coded), "--pretrained", str(tiny["pre_path"]), "--method", "task_arithmetic",
                                      "--out", str(tiny["dir"] / "m.safetensors"), "--no-progress"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output and "malformed entropy-coded stream" in result.output


def test_cli_entropy_option_and_info(tiny):
    runner = CliRunner()
    args = ["quantize", "-p", str(tiny["pre_path"]), "-f", f"a={tiny['ft_paths']['task0']}", "--bits", "2", "--no-progress"]
    off = runner.invoke(app, [*args, "-o", str(tiny["dir"] / "off"), "--entropy", "off"])
    on = runner.invoke(app, [*args, "-o", str(tiny["dir"] / "on")])
    assert off.exit_code == 0 and on.exit_code == 0, off.output + on.output
    assert json.loads((tiny["dir"] / "off" / "manifest.json").read_text())["version"] == 2
    info = runner.invoke(app, ["info", str(tiny["dir"] / "on")])
    assert "entropy coding:" in info.output and "saved" in info.output
    assert "entropy coding:" not in runner.invoke(app, ["info", str(tiny["dir"] / "off")]).output
    bad = runner.invoke(app, [*args, "-o", str(tiny["dir"] / "bad"), "--entropy", "maybe"])
    assert bad.exit_code == 2 and "entropy" in bad.output and not (tiny["dir"] / "bad").exists()


def test_coded_tensors_stay_quantized_entries(coded):
    """Coded tensors stay kind ``q``: every tool that looks for quantized tensors still finds them."""
    pack = open_pack(coded)
    entries = [e for f in pack.manifest.files.values() for e in f.tensors.values() if e.kind == "q"]
    assert entries and all(e.entropy is not None for e in entries if e.numel >= 4096)

@pytest.mark.parametrize("name", ["tvq2", "rtvq-b3o2"])
def test_entropy_max_writes_the_same_format_no_larger_and_merges_the_same(tiny, name):
    """`--entropy max` (zstd's optimal parser) is only a slower writer: same records and
    version, every tensor decodes the same, no tensor larger than `auto` makes it, same merge."""
    on, _ = _both(tiny, name)
    strong = tiny["dir"] / f"{name}-max"
    quantize(tiny["pre_path"], tiny["ft_paths"], strong, QuantizeOptions(**{**vars(OPTIONS[name]), "entropy": "max"}), progress=False)
    m_on, m_max = read_manifest_json(on), read_manifest_json(strong)
    assert m_max["version"] == m_on["version"]
    p_on, p_max = open_pack(on), open_pack(strong)
    p_max.verify()
    for rel, f in p_on.manifest.files.items():
        for key, entry in f.tensors.items():
            other = p_max.manifest.files[rel].tensors[key]
            assert other.kind == entry.kind and other.stored_bytes <= entry.stored_bytes, (rel, key)
            assert torch.equal(p_on.decode(rel, key), p_max.decode(rel, key)), (rel, key)
    assert pack_summary(strong)["entropy"]["stored_bytes"] < pack_summary(on)["entropy"]["stored_bytes"]
    merged = [merge_state_dict("ties", *load_task_vectors(tiny["pre_path"], packs=[p]), {}) for p in (on, strong)]
    for key in merged[0]:
        assert merged[0][key].numpy().tobytes() == merged[1][key].numpy().tobytes(), key


def test_entropy_option_names_its_choices():
    with pytest.raises(Exception, match="choose auto, max or off"):
        QuantizeOptions(entropy="best").validated()  # type: ignore[arg-type]
