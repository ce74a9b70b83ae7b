"""EMR's per-task folders carry a real recipe: ``tvq merge --config tvq_recipe.yml`` writes them
again, byte for byte, whether the task's model came from a unified pack (``unified:`` and
``task:``) or straight from packs (``task:``); recipes written before those keys still load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tvq.cli import app
from tvq.merge.recipe import read_recipe, write_recipe

from merge_helpers import make_ckpts, make_pack

runner = CliRunner()


def run(*args: object) -> None:
    result = runner.invoke(app, ["merge", *map(str, args), "--no-progress"])
    assert result.exit_code == 0, result.output


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    ckpts = make_ckpts(tmp_path)
    return {**ckpts, "pack": make_pack(ckpts, tmp_path / "pack", bits=3)}


def same_folder(a: Path, b: Path, but: tuple[str, ...] = ()) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in set(names) - set(but):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_unified_task_recipe_replays_from_another_directory(inputs, tmp_path, monkeypatch):
    unified = tmp_path / "emr.safetensors"
    run("--method", "emr", "--pack", inputs["pack"], "-p", inputs["pre_path"], "-o", unified)
    monkeypatch.chdir(tmp_path)  # relative inputs: the recipe records them absolute
    out = tmp_path / "t1"
    run("--method", "emr", "--unified", "emr.safetensors", "--task", "t1", "-p", "pre.safetensors", "--out-kind", "folder",
        "--dtype", "float16", "--norm-stats", "pretrained", "-o", out)  # fmt: skip
    recipe = yaml.safe_load((out / "tvq_recipe.yml").read_text())
    assert recipe["unified"] == str(unified) and recipe["task"] == "t1" and recipe["norm_stats"] == "pretrained"
    assert "packs" not in recipe and "tasks" not in recipe and recipe["options"] == {}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run("--config", out / "tvq_recipe.yml", "--out-kind", "folder", "-o", "again")
    same_folder(out, elsewhere / "again", but=("README.md",))  # the card shows the paths as given: relative, then absolute


def test_flags_replace_the_recipes_unified_pack(inputs, tmp_path):
    """Inputs on the command line replace the config's, the unified pack included: its task stays."""
    unified = tmp_path / "emr.safetensors"
    run("--method", "emr", "--pack", inputs["pack"], "-p", inputs["pre_path"], "-o", unified)
    out = tmp_path / "t0"
    run("--method", "emr", "--unified", unified, "--task", "t0", "-p", inputs["pre_path"], "--out-kind", "folder", "-o", out)
    direct = tmp_path / "direct.safetensors"
    run("--config", out / "tvq_recipe.yml", "--pack", inputs["pack"], "-o", direct)
    via_packs = tmp_path / "via.safetensors"
    run("--method", "emr", "--pack", inputs["pack"], "--task", "t0", "-p", inputs["pre_path"], "-o", via_packs)
    assert direct.read_bytes() == via_packs.read_bytes()


def test_emr_task_from_packs_records_the_task_and_replays(inputs, tmp_path):
    out = tmp_path / "t2"
    run("--method", "emr", "--pack", inputs["pack"], "--task", "t2", "-p", inputs["pre_path"], "--out-kind", "folder", "-o", out)
    recipe = yaml.safe_load((out / "tvq_recipe.yml").read_text())
    assert recipe["task"] == "t2" and recipe["packs"] == [str(inputs["pack"])]
    again = tmp_path / "again"
    run("--config", out / "tvq_recipe.yml", "--out-kind", "folder", "-o", again)
    same_folder(out, again)


def test_a_recipe_written_before_task_and_unified_loads_as_before(tmp_path):
    old = tmp_path / "tvq_recipe.yml"
    old.write_text("method: ties\noptions: {density: 0.2}\npretrained: /m/base\npacks: [/m/pack]\ntasks: [a, b]\ndtype: same\n")
    plan = read_recipe(old)
    assert plan.task is None and plan.unified is None and plan.tasks == ["a", "b"] and plan.options == {"density": 0.2}
    written = yaml.safe_load(write_recipe(plan))
    assert "task" not in written and "unified" not in written
    assert written == {"method": "ties", "options": {"density": 0.2}, "pretrained": "/m/base", "packs": ["/m/pack"], "tasks": ["a", "b"],
                       "dtype": "same"}  # fmt: skip


def test_a_recipe_round_trips_task_and_unified(tmp_path):
    path = tmp_path / "r.yml"
    path.write_text("method: emr\nunified: /m/emr.safetensors\ntask: sst2\npretrained: /m/base\n")
    plan = read_recipe(path)
    assert plan.unified == Path("/m/emr.safetensors") and plan.task == "sst2" and plan.options == {}
    path.write_text(write_recipe(plan))
    again = read_recipe(path)
    assert (again.unified, again.task, again.method, again.pretrained) == (plan.unified, plan.task, "emr", plan.pretrained)
