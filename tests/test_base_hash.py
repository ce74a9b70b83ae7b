"""A pack is merged or exported only on the pretrained model it was made from, by content hash.

Keys and shapes match for any revision of a model; ``pretrained.digest`` (docs/pack-format.md)
tells them apart. A wrong base is one line naming the base, the pack and both digests, and
leaves no output; packs with sha256 digests (made before BLAKE3) and the v1 fixtures still merge.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tvq import QuantizeOptions, quantize
from tvq.cli import app
from tvq.encode.job import tensor_digest
from tvq.io.base_check import checkpoint_digest, digest_line, short
from tvq.io.readers import open_checkpoint
from tvq.pack.manifest import Manifest
from tvq.pack.reader import open_pack

runner = CliRunner()
PACK_V1 = Path(__file__).parent / "fixtures" / "pack_v1"


def small_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 8, generator=g),
        "a.bias": torch.randn(8, generator=g),
        "b.weight": torch.randn(6, 8, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(6),
    }


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    pre = small_model()
    save_file(pre, tmp_path / "pre.safetensors")
    fts = {}
    for i in range(2):
        g = torch.Generator().manual_seed(10 + i)
        ft = {k: (v + (0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v) for k, v in pre.items()}
        fts[f"t{i}"] = tmp_path / f"t{i}.safetensors"
        save_file(ft, fts[f"t{i}"])
    wrong = dict(pre)
    wrong["a.weight"] = pre["a.weight"].clone()
    wrong["a.weight"][3, 5] += 1e-3  # same keys, dtypes and shapes: one element differs
    save_file(wrong, tmp_path / "wrong.safetensors")
    return {"dir": tmp_path, "pre": tmp_path / "pre.safetensors", "wrong": tmp_path / "wrong.safetensors", **fts}


def make_pack(inputs: dict[str, Path], name: str, algorithm: str = "blake3", **options) -> Path:
    out = inputs["dir"] / name
    fts = {n: inputs[n] for n in ("t0", "t1")}
    quantize(inputs["pre"], fts, out, QuantizeOptions(bits=4, **options), progress=False, digest_algorithm=algorithm)
    return out


def tamper(pack: Path, change: Callable[[dict], object]) -> None:
    """Change the parsed manifest and store it with a valid digest (anyone can)."""
    m = json.loads((pack / "manifest.json").read_text())
    change(m)
    body = {k: v for k, v in m.items() if k != "digest"}
    digest = Manifest.model_validate({**body, "digest": ""}).compute_digest()
    (pack / "manifest.json").write_text(json.dumps({**body, "digest": digest}))


def cli(*args: object):
    return runner.invoke(app, [*map(str, args), "--no-progress"])


def assert_refused(result, base: Path, pack: Path, expected: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    line = " ".join(result.output.split())  # rich may wrap a long line
    assert str(base) in line and str(pack) in line and "content hash" in line, result.output
    assert short(expected) in line, result.output


def test_digest_lines_are_the_encoders():
    t = torch.randn(3, 4).to(torch.bfloat16)
    for algorithm in ("blake3", "sha256"):
        assert digest_line("k", t, algorithm) == tensor_digest("k", t, algorithm)


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
@pytest.mark.parametrize("threads", [1, 3])
def test_checkpoint_digest_is_the_packs(inputs, algorithm, threads):
    pack = make_pack(inputs, f"p-{algorithm}", algorithm)
    recorded = open_pack(pack).manifest.pretrained.digest
    assert recorded.startswith("blake3:") == (algorithm == "blake3")  # sha256: bare hex, as packs made before BLAKE3
    assert checkpoint_digest(open_checkpoint(inputs["pre"]), algorithm, threads=threads) == recorded
    assert checkpoint_digest(open_checkpoint(inputs["wrong"]), algorithm, threads=threads) != recorded


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
@pytest.mark.parametrize("out_name", ["merged.safetensors", "merged_dir"])
def test_a_wrong_base_is_refused_and_leaves_no_output(inputs, algorithm, out_name):
    pack = make_pack(inputs, "p", algorithm)
    out = inputs["dir"] / out_name
    kind = ["--out-kind", "folder"] if out_name.endswith("dir") else []
    result = cli("merge", "--method", "ta", "--pack", pack, "-p", inputs["wrong"], "-o", out, *kind)
    assert_refused(result, inputs["wrong"], pack, open_pack(pack).manifest.pretrained.digest)
    assert sorted(p.name for p in inputs["dir"].iterdir() if "merged" in p.name) == []  # no output, no temporary
    right = cli("merge", "--method", "ta", "--pack", pack, "-p", inputs["pre"], "-o", out, *kind)
    assert right.exit_code == 0, right.output


def test_a_wrong_base_leaves_an_existing_output_untouched(inputs):
    pack = make_pack(inputs, "p")
    out = inputs["dir"] / "merged.safetensors"
    assert cli("merge", "--method", "ta", "--pack", pack, "-p", inputs["pre"], "-o", out).exit_code == 0
    before = out.read_bytes()
    result = cli("merge", "--method", "ta", "--pack", pack, "-p", inputs["wrong"], "-o", out, "--overwrite")
    assert_refused(result, inputs["wrong"], pack, open_pack(pack).manifest.pretrained.digest)
    assert out.read_bytes() == before


def test_every_pack_is_checked_and_checkpoints_need_no_digest(inputs):
    good = make_pack(inputs, "good")
    other = inputs["dir"] / "other"
    quantize(inputs["pre"], {"u": inputs["t0"]}, other, QuantizeOptions(bits=4), progress=False)
    fake = "blake3:" + "0" * 64
    tamper(other, lambda m: m["pretrained"].update(digest=fake))  # a pack made from another base of the same shapes
    out = inputs["dir"] / "m.safetensors"
    result = cli("merge", "--method", "ta", "--pack", good, "--pack", other, "-p", inputs["pre"], "-o", out)
    assert_refused(result, inputs["pre"], other, fake)
    assert not out.exists()
    mixed = cli("merge", "--method", "ta", "--pack", good, "-f", f"x={inputs['t0']}", "-p", inputs["pre"], "-o", out)
    assert mixed.exit_code == 0, mixed.output


def test_the_recorded_path_does_not_matter(inputs):
    """A pack made from a hub id or on another machine records a path tvq never opens: the hash decides."""
    pack = make_pack(inputs, "p")
    tamper(pack, lambda m: m["pretrained"].update(path="org/model@main"))
    out = inputs["dir"] / "m.safetensors"
    assert cli("merge", "--method", "ta", "--pack", pack, "-p", inputs["pre"], "-o", out).exit_code == 0
    result = cli("merge", "--method", "ta", "--pack", pack, "-p", inputs["wrong"], "-o", inputs["dir"] / "n.safetensors")
    assert_refused(result, inputs["wrong"], pack, open_pack(pack).manifest.pretrained.digest)


def test_the_same_base_in_another_form_is_accepted(inputs):
    """The digest covers keys, dtypes, shapes and bytes, not the file: a sharded copy verifies."""
    pack = make_pack(inputs, "p")
    state = load_file(inputs["pre"])
    folder = inputs["dir"] / "sharded"
    folder.mkdir()
    save_file({k: state[k] for k in ("a.weight", "position_ids")}, folder / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in ("a.bias", "b.weight")}, folder / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "position_ids": "model-00001-of-00002.safetensors",
                                           "a.bias": "model-00002-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    out = inputs["dir"] / "m.safetensors"
    result = cli("merge", "--method", "ta", "--pack", pack, "-p", folder, "-o", out)
    assert result.exit_code == 0, result.output


def test_export_checks_the_base(inputs):
    pack = make_pack(inputs, "p", target="finetuned")
    out = inputs["dir"] / "x.safetensors"
    result = cli("export", pack, "--task", "t0", "--model", "-p", inputs["wrong"], "-o", out)
    assert_refused(result, inputs["wrong"], pack, open_pack(pack).manifest.pretrained.digest)
    assert not out.exists()
    assert cli("export", pack, "--task", "t0", "--model", "-p", inputs["pre"], "-o", out).exit_code == 0
    folder = inputs["dir"] / "xf"
    result = cli("export", pack, "--task", "t0", "--model", "-p", inputs["wrong"], "-o", folder, "--out-kind", "folder")
    assert_refused(result, inputs["wrong"], pack, open_pack(pack).manifest.pretrained.digest)
    assert not folder.exists()


@pytest.mark.parametrize("name", ["rtvq", "fq"])
def test_v1_fixture_packs_still_merge_on_their_base(tmp_path, name):
    out = tmp_path / "m.safetensors"
    result = cli("merge", "--method", "ta", "--pack", PACK_V1 / name, "-p", PACK_V1 / "inputs" / "pre.safetensors", "-o", out)
    assert result.exit_code == 0, result.output
    wrong = tmp_path / "wrong.safetensors"
    state = load_file(PACK_V1 / "inputs" / "pre.safetensors")
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1
    save_file(state, wrong)
    result = cli("merge", "--method", "ta", "--pack", PACK_V1 / name, "-p", wrong, "-o", tmp_path / "n.safetensors")
    assert_refused(result, wrong, PACK_V1 / name, open_pack(PACK_V1 / name).manifest.pretrained.digest)
