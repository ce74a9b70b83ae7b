"""Merged folders: a model card huggingface_hub reads, the recipe, shards planned by
huggingface_hub that match their index, ``--out-kind``, and ``tvq export --model`` folders."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard, split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tvq.cli import app
from tvq.merge.engine import _plan_shards
from tvq.merge.registry import method_class

from merge_helpers import tiny_bert_inputs

runner = CliRunner()


def run(*args) -> object:
    return runner.invoke(app, [*map(str, args), "--no-progress"])


def ok(result) -> None:
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    """A tiny random BERT built locally (no download), two fine-tunes in a 4-bit pack, one more as a file."""
    return tiny_bert_inputs(tmp_path_factory.mktemp("card"), 2, {"README.md": "# the base model's own card\n"})


def test_model_card_parses_and_has_the_metadata(hf, tmp_path):
    out = tmp_path / "merged"
    ok(run("merge", "--method", "ties", "--density", "0.3", "-p", hf["pre"], "--pack", hf["pack"], "-f", f"c={hf['ft']['c']}", "--out", out))
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == str(hf["pre"])
    assert {"merge", "tvq", "ties"} <= set(data["tags"])
    assert data["library_name"] == "transformers"
    tvq = data["tvq"]
    assert tvq["method"] == "ties"
    assert set(tvq["options"]) == set(method_class("ties").Options.names())  # every option, defaults included
    assert tvq["options"]["density"] == 0.3 and tvq["options"]["lambda"] == 0.3
    tasks = {t["name"]: t for t in tvq["tasks"]}
    assert tasks["a"]["bits"] == tasks["b"]["bits"] == 4 and tasks["a"]["quantization"] == "TVQ INT4"
    assert tasks["c"] == {"name": "c", "source": "checkpoint", "path": str(hf["ft"]["c"]), "bits": 32}
    assert "tvq merge --config tvq_recipe.yml" in card.text
    assert (out / "tvq_recipe.yml").is_file() and not (out / "mergekit_config.yml").exists()
    # a file output has no room for a card: the same weights, no README
    ok(run("merge", "--method", "ties", "--density", "0.3", "-p", hf["pre"], "--pack", hf["pack"], "-f", f"c={hf['ft']['c']}",
           "--out", tmp_path / "m.safetensors"))  # fmt: skip
    assert (tmp_path / "m.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_shards_match_the_index_load_and_follow_huggingface_hub(hf, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "sharded"
    ok(run("merge", "--method", "task_arithmetic", "-p", hf["pre"], "--pack", hf["pack"], "--max-shard-size", "6KB", "--out", out))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    seen = {}
    for name in shards:
        with safe_open(out / name, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                assert index["weight_map"][key] == name
                seen[key] = f.get_tensor(key)
    assert seen.keys() == hf["state"].keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in seen.values())
    # huggingface_hub's own split of the same tensors gives the same files and grouping
    split = split_torch_state_dict_into_shards({k: seen[k] for k in hf["state"]}, max_shard_size=6000)  # 6KB = 6000 bytes
    assert split.tensor_to_filename == index["weight_map"]
    model = AutoModel.from_pretrained(out)
    assert torch.equal(model.state_dict()["encoder.layer.0.attention.self.query.weight"], seen["encoder.layer.0.attention.self.query.weight"])


def test_plan_shards_puts_a_large_tensor_alone_like_huggingface_hub():
    sizes = {"a": 10, "big": 100, "b": 20, "c": 30, "d": 5}
    plan = _plan_shards(list(sizes), sizes, 40)
    tensors = {k: torch.zeros(v, dtype=torch.uint8) for k, v in sizes.items()}
    hub = split_torch_state_dict_into_shards(tensors, max_shard_size=40)
    assert plan == hub.filename_to_tensors
    assert plan["model-00001-of-00003.safetensors"] == ["big"]  # not a contiguous run of keys: written all the same
    assert _plan_shards(["x"], {"x": 1}, 40) == {"model.safetensors": ["x"]}


def test_out_kind_says_what_is_written(hf, tmp_path):
    pre_file = tmp_path / "pre.safetensors"
    save_file(hf["state"], pre_file)
    ft = [x for n in "ab" for x in ("-f", f"{n}={hf['ft'][n]}")]
    ok(run("merge", "--method", "average", "-p", pre_file, *ft, "--out", tmp_path / "auto_file"))
    assert (tmp_path / "auto_file").is_file()  # today's rule: a file from a pretrained file
    ok(run("merge", "--method", "average", "-p", pre_file, *ft, "--out-kind", "folder", "--out", tmp_path / "folder"))
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["README.md", "model.safetensors", "tvq_recipe.yml"]
    ok(run("merge", "--method", "average", "-p", hf["pre"], *ft, "--out-kind", "file", "--out", tmp_path / "plain"))
    assert (tmp_path / "plain").is_file()
    assert (tmp_path / "plain").read_bytes() == (tmp_path / "auto_file").read_bytes() == (tmp_path / "folder" / "model.safetensors").read_bytes()
    bad = run("merge", "--method", "average", "-p", hf["pre"], *ft, "--out-kind", "dir", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "--out-kind 'dir'" in bad.output


def test_export_model_folder_loads_with_transformers(hf, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "a-model"
    ok(run("export", hf["pack"], "--task", "a", "--model", "-p", hf["pre"], "--out-kind", "folder", "--out", out))
    assert (out / "config.json").is_file()
    ok(run("export", hf["pack"], "--task", "a", "--model", "-p", hf["pre"], "--out", tmp_path / "a.safetensors"))
    as_file = load_file(tmp_path / "a.safetensors")
    as_folder = load_file(out / "model.safetensors")
    assert as_file.keys() == as_folder.keys() and all(torch.equal(as_file[k], as_folder[k]) for k in as_file)
    model = AutoModel.from_pretrained(out)
    key = "encoder.layer.1.output.dense.weight"
    assert torch.equal(model.state_dict()[key], as_file[key])
    bad = run("export", hf["pack"], "--task", "a", "--out-kind", "folder", "--out", tmp_path / "tv")
    assert bad.exit_code == 2 and "add --model" in bad.output
