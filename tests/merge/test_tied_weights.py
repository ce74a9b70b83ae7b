"""Weights tied under several names (shared embeddings) merge once and are written under every name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvq import QuantizeOptions, quantize
from tvq.errors import CheckpointError
from tvq.io.readers import MemoryReader, open_checkpoint
from tvq.io.tied import align_ties, tied_names
from tvq.merge import load_task_vectors, merge, merge_state_dict
from tvq.merge.source import TaskSource
from tvq.pack.reader import open_pack
from tvq.vector import TaskVector


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layer.weight": torch.randn(16, 16, generator=g),
        "layer.bias": torch.randn(16, generator=g),
    }
    sd["head.weight"] = sd["embed.weight"]  # tied: torch.save keeps one storage
    return sd


def _finetuned(pre: dict[str, torch.Tensor], seed: int, tied: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    out = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in pre.items() if k != "head.weight"}
    out["head.weight"] = out["embed.weight"] if tied else out["embed.weight"] + 0.01
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The same three fine-tunes as torch files (tied) and as safetensors (the tie stored once,
    under its first name, as Hugging Face saves it), each quantized to 2 bits (many ties at TIES's cut-off)."""
    root = tmp_path_factory.mktemp("tied")
    pre = _model(0)
    torch.save(pre, root / "pre.pt")
    save_file({k: v for k, v in pre.items() if k != "head.weight"}, root / "pre.safetensors")
    pt, st = {}, {}
    for i in range(3):
        ft = _finetuned(pre, i)
        pt[f"t{i}"], st[f"t{i}"] = root / f"t{i}.pt", root / f"t{i}.safetensors"
        torch.save(ft, pt[f"t{i}"])
        save_file({k: v.contiguous() for k, v in ft.items() if k != "head.weight"}, st[f"t{i}"])
    quantize(root / "pre.pt", pt, root / "pt_pack", QuantizeOptions(bits=2), progress=False)
    quantize(root / "pre.safetensors", st, root / "st_pack", QuantizeOptions(bits=2), progress=False)
    return {"root": root, "pt": pt, "st": st}


def test_tied_names_are_the_same_view_of_one_storage(tmp_path):
    a = torch.randn(4, 6)
    sd = {"a": a, "b": a, "view": a[1:], "copy": a.clone(), "t": a.t(), "c": a}
    torch.save(sd, tmp_path / "sd.pt")
    expected = {"b": "a", "c": "a"}  # an offset view, a transpose and a copy are tensors of their own
    assert tied_names(open_checkpoint(tmp_path / "sd.pt")) == expected
    assert tied_names(MemoryReader(sd)) == expected
    assert tied_names(MemoryReader({"x": torch.empty(0), "y": torch.empty(0)})) == {}  # empty tensors share no data


def test_a_pack_knows_tied_tensors_from_its_manifest(files):
    pack = open_pack(files["root"] / "pt_pack")
    assert pack.same_tensor("t0", "head.weight", "embed.weight")
    assert not pack.same_tensor("t0", "layer.weight", "embed.weight")


@pytest.mark.parametrize(
    ("method", "options"),
    [("ties", {}), ("ties", {"scope": "tensor"}), ("dare", {"seed": 3}), ("della", {}), ("breadcrumbs", {}), ("task_arithmetic", {})],
    ids=["ties-global", "ties-tensor", "dare", "della", "breadcrumbs", "task_arithmetic"],
)
def test_a_tie_merges_once_and_as_if_stored_once(files, tmp_path, method, options):
    """From the torch files, the tie is kept in a .pt written like them; every tensor is what the
    same merge gives from the safetensors copies that store the tie once (global TIES counts it once)."""
    root = files["root"]
    reader, vectors = load_task_vectors(root / "pre.pt", packs=[root / "pt_pack"])
    merge(method, reader, vectors, tmp_path / "m.pt", options)
    got = torch.load(tmp_path / "m.pt", weights_only=True)
    assert got["head.weight"].untyped_storage().data_ptr() == got["embed.weight"].untyped_storage().data_ptr()
    reader, vectors = load_task_vectors(root / "pre.safetensors", packs=[root / "st_pack"])
    merge(method, reader, vectors, tmp_path / "m.safetensors", options)
    expected = load_file(tmp_path / "m.safetensors")
    assert not torch.equal(expected["embed.weight"], load_file(root / "pre.safetensors")["embed.weight"])
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_fine_tunes_that_untie_the_weights_merge_them_apart(files, tmp_path):
    root = files["root"]
    pre = torch.load(root / "pre.pt", weights_only=True)
    untied = {"t0": files["pt"]["t0"], "u": root / "untied.pt"}
    torch.save(_finetuned(pre, 9, tied=False), untied["u"])
    reader, vectors = load_task_vectors(root / "pre.pt", finetuned=untied)
    assert TaskSource(reader, vectors).tied == {}  # τ differs in one task: two tensors
    tied_reader, tied_vectors = load_task_vectors(root / "pre.pt", finetuned=files["pt"])
    assert TaskSource(tied_reader, tied_vectors).tied == {"head.weight": "embed.weight"}
    merge("ties", reader, vectors, tmp_path / "m.safetensors", {})
    out = load_file(tmp_path / "m.safetensors")
    assert not torch.equal(out["head.weight"], out["embed.weight"])
    with pytest.raises(CheckpointError, match="shares its storage with another tensor that overwrote it with other values"):
        merge("ties", reader, vectors, tmp_path / "m.pt", {})  # a .pt written like the tied file cannot hold two values


def test_a_module_state_dict_merges_its_tie_once():
    pre = _model(1)
    taus = {f"t{i}": TaskVector.from_state_dict({k: v - pre[k] for k, v in _finetuned(pre, i).items()}) for i in range(2)}
    out = merge_state_dict("dare", pre, taus, {"seed": 5})
    assert torch.equal(out["head.weight"], out["embed.weight"])
    assert TaskSource(MemoryReader(pre), taus).keys == ["embed.weight", "layer.weight", "layer.bias"]


def test_a_reader_aligns_a_tie_stored_once_to_one_listed_twice(files):
    root = files["root"]
    st, pt = open_checkpoint(files["st"]["t0"]), open_checkpoint(files["pt"]["t0"])
    align_ties(open_checkpoint(root / "pre.pt"), st)  # the pretrained file lists head.weight: read it as embed.weight
    assert "head.weight" in st and torch.equal(st.get("head.weight"), pt.get("head.weight"))
    assert torch.equal(st.get_elements("head.weight", 5, 40), st.get_elements("embed.weight", 5, 40))
    align_ties(open_checkpoint(root / "pre.safetensors"), pt)  # the pretrained file stores the tie once
    assert "head.weight" not in pt and "embed.weight" in pt
    untied = MemoryReader({"embed.weight": torch.zeros(3), "other": torch.zeros(3)})
    align_ties(MemoryReader({"embed.weight": torch.ones(3)}), untied)  # nothing tied: nothing changes
    assert untied.keys() == ["embed.weight", "other"]


@pytest.mark.parametrize(("pre", "finetuned"), [("pre.pt", "st"), ("pre.safetensors", "pt")], ids=["pt-pre", "safetensors-pre"])
def test_fine_tunes_that_store_the_tie_otherwise_merge_alike(files, tmp_path, pre, finetuned):
    """A torch-saved pretrained model with Hugging Face safetensors fine-tunes (the tie stored
    once), and the other way round: the same merge as when every file stores it alike."""
    root = files["root"]
    reader, vectors = load_task_vectors(root / "pre.safetensors", finetuned=files["st"])
    merge("ties", reader, vectors, tmp_path / "expected.safetensors", {})
    expected = load_file(tmp_path / "expected.safetensors")
    reader, vectors = load_task_vectors(root / pre, finetuned=files[finetuned])
    out = tmp_path / ("m.pt" if pre.endswith(".pt") else "m.safetensors")
    merge("ties", reader, vectors, out, {})
    got = torch.load(out, weights_only=True) if out.suffix == ".pt" else load_file(out)
    assert set(got) == set(open_checkpoint(root / pre).keys())
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    quantize(root / pre, files[finetuned], tmp_path / "pack", QuantizeOptions(bits=2), progress=False)
    assert sorted(open_pack(tmp_path / "pack").keys) == sorted(open_checkpoint(root / pre).keys())
