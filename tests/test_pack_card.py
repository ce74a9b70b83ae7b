"""Packs carry a model card (``README.md``) that ``huggingface_hub.ModelCard`` loads; tvq itself
never reads it, so a stranger's pack with a huge or odd README reads, verifies and merges."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from tvq import QuantizeOptions, open_pack, quantize
from tvq.cli import app
from tvq.encode.incremental import add_tasks, rebase
from tvq.merge import load_task_vectors
from tvq.merge.engine import merge_state_dict
from tvq.report import pack_summary

runner = CliRunner()


def _card(pack: Path) -> ModelCard:
    return ModelCard.load(pack / "README.md")


def test_quantize_add_and_rebase_write_a_card_with_the_packs_metadata(tiny):
    d = tiny["dir"]
    two = {n: tiny["ft_paths"][n] for n in ("task0", "task1")}
    options = QuantizeOptions(bits=2, residual=True, base_bits=3, error_correction=True)
    quantize(tiny["pre_path"], two, d / "p2", options, progress=False)
    m = open_pack(d / "p2").manifest
    card = _card(d / "p2")
    assert card.data.base_model == m.pretrained.path
    assert card.data.library_name == "tvq"
    assert card.data.tags == ["tvq", "task-vectors", "quantized", "rtvq-b3o2-ec"]
    meta = card.data.to_dict()["tvq"]
    assert meta["scheme"]["bits"] == 2 and meta["scheme"]["base_bits"] == 3 and meta["scheme"]["quantizer"] == "minmax"
    assert [t["name"] for t in meta["tasks"]] == ["task0", "task1"]
    assert [t["rel_error"] for t in meta["tasks"]] == [t.rel_error for t in m.tasks]
    info = pack_summary(d / "p2")["tasks"]  # what ``tvq info`` reports
    assert [t["bits_per_param"] for t in meta["tasks"]] == [round(t["bits_per_param"], 4) for t in info]
    assert [t["bytes"] for t in meta["tasks"]] == [t["bytes"] for t in info]
    assert "tvq merge --method ties --pack PACK" in card.text and "| task0 |" in card.text

    add_tasks(d / "p2", {"task2": tiny["ft_paths"]["task2"]}, d / "p3", pretrained=tiny["pre_path"], progress=False)
    assert [t["name"] for t in _card(d / "p3").data.to_dict()["tvq"]["tasks"]] == ["task0", "task1", "task2"]
    rebase(d / "p3", d / "p3r", pretrained=tiny["pre_path"], from_pack=True, progress=False)
    assert _card(d / "p3r").data.to_dict()["tvq"]["scheme"]["label"] == "RTVQ B3O2+EC"
    open_pack(d / "p3r").verify()


def test_fq_card_tags_the_method(tiny):
    d = tiny["dir"]
    quantize(tiny["pre_path"], {"task0": tiny["ft_paths"]["task0"]}, d / "fq", QuantizeOptions(bits=8, target="finetuned"), progress=False)
    card = _card(d / "fq")
    assert "fq-int8" in card.data.tags and card.data.to_dict()["tvq"]["scheme"]["target"] == "finetuned"


@pytest.mark.parametrize("kind", ["fifo", "huge", "missing"])
def test_a_strangers_readme_is_never_read(tiny, kind):
    d = tiny["dir"]
    quantize(tiny["pre_path"], dict(tiny["ft_paths"]), d / "p", QuantizeOptions(bits=4), progress=False)
    pre, vectors = load_task_vectors(tiny["pre_path"], packs=[d / "p"])
    expected = merge_state_dict("task_arithmetic", pre, vectors)
    shutil.copytree(d / "p", d / "stranger")
    readme = d / "stranger" / "README.md"
    readme.unlink()
    if kind == "fifo":
        os.mkfifo(readme)  # reading it would block forever
    elif kind == "huge":
        with readme.open("wb") as f:
            f.truncate(1 << 40)  # 1 TiB, sparse
    open_pack(d / "stranger").verify()
    for args in (["verify", str(d / "stranger")], ["info", str(d / "stranger"), "--verify"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    pre, vectors = load_task_vectors(tiny["pre_path"], packs=[d / "stranger"])
    merged = merge_state_dict("task_arithmetic", pre, vectors)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    add_tasks(d / "stranger", {"extra": tiny["ft_paths"]["task0"]}, pretrained=tiny["pre_path"], progress=False)  # in place
    assert (d / "stranger" / "README.md").is_file()  # the stranger's README is replaced by tvq's card
    assert "extra" in [t["name"] for t in _card(d / "stranger").data.to_dict()["tvq"]["tasks"]]
