"""A task's model written from a unified EMR pack (``--unified ... --task``) carries a model card
and the command that reproduces it, like every merged folder."""

from __future__ import annotations

import shlex

from huggingface_hub import ModelCard
from typer.testing import CliRunner

from tvq.cli import app

from merge_helpers import tiny_bert_inputs

runner = CliRunner()


def run(*args) -> None:
    result = runner.invoke(app, ["merge", *map(str, args), "--no-progress"])
    assert result.exit_code == 0, result.output


def test_unified_task_folder_has_a_card_and_a_recipe_that_reproduces_it(tmp_path):
    hf = tiny_bert_inputs(tmp_path, 2, {})
    unified = tmp_path / "emr.safetensors"
    run("--method", "emr_merging", "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", unified)
    out = tmp_path / "via"
    run("--method", "emr", "--unified", unified, "--task", "b", "--pretrained", hf["pre"], "--out", out, "--dtype", "bfloat16")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(hf["pre"])
    assert card.data.library_name == "transformers"
    assert {"tvq", "emr", "merge"} <= set(card.data.tags)
    meta = card.data.to_dict()["tvq"]
    assert meta["task"] == "b" and meta["unified"] == str(unified) and meta["tasks"] == ["a", "b"] and meta["dtype"] == "bfloat16"
    command = (out / "tvq_recipe.sh").read_text().strip()
    assert command in card.text
    args = shlex.split(command)
    assert args[:2] == ["tvq", "merge"] and args[-2:] == ["--out", "OUT"]
    again = tmp_path / "again"
    result = runner.invoke(app, [*args[1:-1], str(again), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (again / "README.md").read_text() == (out / "README.md").read_text()
