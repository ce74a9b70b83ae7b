"""``tvq add`` / ``tvq rebase`` on a ``--key-rule paper`` pack whose kept tensor (a frozen token
embedding) is the constant 0 in the first tasks: it stays kept, raw for a task that changes it;
validation accepts that mix for kept tensors only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tvq import QuantizeOptions, open_pack, quantize
from tvq.encode.incremental import add_tasks, rebase
from tvq.errors import PackError
from tvq.merge import load_task_vectors
from tvq.merge.engine import merge_state_dict
from tvq.pack.manifest import manifest_checksum

EMB = "token_embedding.weight"  # kept raw by the paper's rule (and frozen in tasks a, b)
W = "blocks.0.attn.weight"  # quantized by the paper's rule
TVQ = QuantizeOptions(bits=4, key_rule="paper")
RTVQ = QuantizeOptions(bits=2, residual=True, base_bits=3, error_correction=True, key_rule="paper")


def _model(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        EMB: torch.randn(12, 8, generator=g),
        W: torch.randn(8, 8, generator=g) * 0.2,
        "blocks.0.attn.bias": torch.randn(8, generator=g) * 0.05,
        "blocks.0.ln_1.weight": 1 + torch.randn(8, generator=g) * 0.01,
    }


@pytest.fixture
def ckpts(tmp_path: Path) -> dict:
    g = torch.Generator().manual_seed(3)
    pre = _model(g)
    save_file(pre, tmp_path / "pre.safetensors")
    paths, fts = {}, {}
    for name, frozen in (("a", True), ("b", True), ("c", False), ("d", True)):
        ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        if frozen:
            ft[EMB] = pre[EMB].clone()
        fts[name], paths[name] = ft, tmp_path / f"{name}.safetensors"
        save_file(ft, paths[name])
    return {"dir": tmp_path, "pre": pre, "pre_path": tmp_path / "pre.safetensors", "fts": fts, "paths": paths}


def _entry(pack: Path, task: str, key: str) -> dict:
    m = json.loads((pack / "manifest.json").read_text())
    rel = next(t["file"] for t in m["tasks"] if t["name"] == task)
    return m["files"][rel]["tensors"][key]


@pytest.mark.parametrize("options", [TVQ, RTVQ], ids=["tvq", "rtvq"])
def test_add_keeps_a_kept_tensor_raw_where_the_new_task_changes_it(ckpts, options):
    d = ckpts["dir"]
    quantize(ckpts["pre_path"], {n: ckpts["paths"][n] for n in "ab"}, d / "p2", options, progress=False)
    assert _entry(d / "p2", "a", EMB)["kind"] == "const"
    add_tasks(d / "p2", {"c": ckpts["paths"]["c"]}, d / "p3", pretrained=ckpts["pre_path"], progress=False)
    add_tasks(d / "p3", {"d": ckpts["paths"]["d"]}, d / "p4", pretrained=ckpts["pre_path"], progress=False)
    emb_c = _entry(d / "p4", "c", EMB)
    assert emb_c["kind"] == "raw" and emb_c["dtype"] == "float32"  # kept, not quantized
    assert [_entry(d / "p4", t, EMB)["kind"] for t in "abd"] == ["const"] * 3
    assert _entry(d / "p4", "c", W)["kind"] == "q"
    pack = open_pack(d / "p4", ckpts["pre_path"])
    pack.verify()
    assert torch.equal(pack.task_tensor("c", EMB), ckpts["fts"]["c"][EMB] - ckpts["pre"][EMB])
    for t in "abd":
        assert not pack.task_tensor(t, EMB).any()
    pre, vectors = load_task_vectors(ckpts["pre_path"], packs=[d / "p4"])
    merged = merge_state_dict("task_arithmetic", pre, vectors, {"lambda": 1.0})
    expected = ckpts["pre"][EMB] + (ckpts["fts"]["c"][EMB] - ckpts["pre"][EMB])
    assert torch.allclose(merged[EMB], expected, atol=1e-6)
    if options.residual:  # rebase from the pack: every task against a new base; the kept tensor is raw for all
        rebase(d / "p4", d / "rebased", pretrained=ckpts["pre_path"], from_pack=True, progress=False)
        rebased = open_pack(d / "rebased", ckpts["pre_path"])
        assert [_entry(d / "rebased", t, EMB)["kind"] for t in "abcd"] == ["raw"] * 4
        for t in "abcd":
            assert torch.equal(rebased.task_tensor(t, EMB), pack.task_tensor(t, EMB))


def _tamper(pack: Path, change) -> None:
    m = json.loads((pack / "manifest.json").read_text())
    change(m)
    body = {k: v for k, v in m.items() if k != "digest"}
    (pack / "manifest.json").write_text(json.dumps({**body, "digest": manifest_checksum(body)}))


def _task_tensors(m: dict, task: str) -> dict:
    rel = next(t["file"] for t in m["tasks"] if t["name"] == task)
    return m["files"][rel]["tensors"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("width", "stored const here and raw in"),  # a quantized tensor's constant (it has a width) beside raw
        ("ndim_rule", "stored const here and raw in"),  # only the paper rule stores a kept tensor's zero
        ("quantized", "stored q here and raw in tasks/002-c"),  # raw in one task, quantized in another
    ],
)
def test_validation_refuses_real_inconsistencies(ckpts, change, problem):
    d = ckpts["dir"]
    quantize(ckpts["pre_path"], {n: ckpts["paths"][n] for n in "ab"}, d / "p2", TVQ, progress=False)
    add_tasks(d / "p2", {"c": ckpts["paths"]["c"]}, d / "p3", pretrained=ckpts["pre_path"], progress=False)
    shutil.copytree(d / "p3", d / "bad")

    def edit(m: dict) -> None:
        a = _task_tensors(m, "a")
        if change == "width":
            a[EMB]["bits"] = 4
        elif change == "ndim_rule":
            m["method"]["key_rule"] = "ndim"
        else:
            raw = dict(_task_tensors(m, "c")[EMB], shape=[8, 8], nbytes=256)
            _task_tensors(m, "c")[W] = raw  # W: quantized in a and b, "raw" in c

    _tamper(d / "bad", edit)
    with pytest.raises(PackError, match=problem):
        open_pack(d / "bad")
    open_pack(d / "p3").verify()  # the untouched pack is fine
