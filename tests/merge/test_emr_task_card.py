"""A task's model written from a unified EMR pack (``--unified ... --task``) carries a model card
and the recipe that reproduces it (``tvq_recipe.yml`` naming the unified pack), like every merged folder."""

from __future__ import annotations

import yaml
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
    recipe = (out / "tvq_recipe.yml").read_text()
    assert recipe.rstrip() in card.text
    plan = yaml.safe_load(recipe)
    assert plan == {"method": "emr", "options": {}, "pretrained": str(hf["pre"].absolute()), "unified": str(unified.absolute()),
                    "task": "b", "dtype": "bfloat16"}  # fmt: skip
    assert not (out / "tvq_recipe.sh").exists()
    again = tmp_path / "again"
    run("--config", out / "tvq_recipe.yml", "--out", again)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (again / "README.md").read_text() == (out / "README.md").read_text()
    assert (again / "tvq_recipe.yml").read_text() == recipe
