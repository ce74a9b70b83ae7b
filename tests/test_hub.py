"""Hub ids wherever a model path is accepted: resolved from a local Hugging Face cache, offline."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from tvq.cli import app
from tvq.errors import CheckpointError
from tvq.io.hub import hub_id_of, parse_hub_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_model(cache, repo: str, tensors: dict[str, torch.Tensor], commit: str = COMMIT, ref: str = "main"):
    """A model as huggingface_hub's cache lays it out: refs/<ref> -> snapshots/<commit>/files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    save_file(tensors, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text("{}")
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("org/name", ("org/name", None)),
        ("org/name@v1.0", ("org/name", "v1.0")),
        (f"Org-1/model.v2@{COMMIT}", ("Org-1/model.v2", COMMIT)),
        ("../escape", None),
        ("org/../name", None),
        ("/abs/path", None),
        ("a/b/c", None),
        ("name", None),
        ("org/name@", None),
    ],
)
def test_hub_id_shape(text, parsed):
    assert parse_hub_id(text) == parsed


def test_hub_ids_resolve_from_the_cache_offline(offline_cache):
    snapshot = cached_model(offline_cache, "acme/tiny", {"w": torch.ones(2)})
    assert resolve_model("acme/tiny") == snapshot
    assert resolve_model(f"acme/tiny@{COMMIT}") == snapshot
    with pytest.raises(CheckpointError, match="acme/other: neither a local path nor a hub model in the cache"):
        resolve_model("acme/other")
    with pytest.raises(CheckpointError, match="acme/tiny@v9"):
        resolve_model("acme/tiny@v9")


def test_an_existing_local_path_wins_over_a_hub_id(offline_cache, tmp_path, monkeypatch):
    cached_model(offline_cache, "acme/tiny", {"w": torch.ones(2)})
    local = tmp_path / "acme" / "tiny"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("acme/tiny") == local.relative_to(tmp_path)


def test_commands_take_hub_ids_for_the_pretrained_and_fine_tuned_models(offline_cache, tmp_path):
    """quantize, merge and the merged folder's files work from ids, as from local folders."""
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(8, 8, generator=g), "b": torch.zeros(8)}
    cached_model(offline_cache, "acme/base", pre)
    cached_model(offline_cache, "acme/ft", {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()})
    runner = CliRunner()
    pack = tmp_path / "pack"
    r = runner.invoke(app, ["quantize", "-p", "acme/base", "-f", "t=acme/ft", "-o", str(pack), "--no-progress"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "merged"
    merge = ["merge", "--method", "task_arithmetic", "--pack", str(pack), "-p", f"acme/base@{COMMIT}", "--out", str(out), "--no-progress"]
    r = runner.invoke(app, merge)
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file()  # a folder like the pretrained one: its files copied
    assert json.loads((pack / "manifest.json").read_text())["pretrained"]["path"] == "acme/base"  # the id, not this cache's path
    r = runner.invoke(app, ["quantize", "-p", "acme/missing", "-f", "t=acme/ft", "-o", str(tmp_path / "p2"), "--no-progress"])
    assert r.exit_code != 0 and "acme/missing: neither a local path nor a hub model in the cache" in r.output


def test_merged_folders_name_a_hub_base_by_its_id_and_replay_from_it(offline_cache, tmp_path):
    """The recipe and card of a merge on a hub model record ``org/name@commit`` and ``org/name``,
    not this machine's cache path; the recipe merges the same bytes again from the id."""
    g = torch.Generator().manual_seed(1)
    pre = {"w": torch.randn(8, 8, generator=g)}
    snapshot = cached_model(offline_cache, "acme/base", pre)
    cached_model(offline_cache, "acme/ft", {"w": pre["w"] + 0.01 * torch.randn(8, 8, generator=g)})
    assert hub_id_of(snapshot) == f"acme/base@{COMMIT}" and hub_id_of(tmp_path) is None
    runner = CliRunner()
    out = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "-m", "task_arithmetic", "-f", "t=acme/ft", "-p", "acme/base", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    recipe = yaml.safe_load((out / "tvq_recipe.yml").read_text())
    assert recipe["pretrained"] == f"acme/base@{COMMIT}"
    assert "base_model: acme/base\n" in (out / "README.md").read_text()
    again = tmp_path / "again"
    r = runner.invoke(app, ["merge", "--config", str(out / "tvq_recipe.yml"), "--out", str(again), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
