"""``tvq merge --config`` with mergekit's YAML (shapes as mergekit's docs show them), tvq's own
recipe, and a quantize + merge pipeline: the same bytes as the equivalent tvq flags; what tvq
cannot honour is one line naming the file and the field."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from tvq.cli import app
from tvq.merge.mergekit_config import setting_value

from merge_helpers import tiny_bert_inputs

runner = CliRunner()


def run(*args) -> object:
    return runner.invoke(app, ["merge", *map(str, args), "--no-progress"])


def ok(result) -> None:
    assert result.exit_code == 0, result.output


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.count("error:") == 1, result.output
    line = " ".join(result.output.split("error:", 1)[-1].split())
    for f in fragments:
        assert f in line, (f, line)
    return line


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    """A tiny BERT folder, a 4-bit pack of two fine-tunes (a, b), and a third fine-tune (c) as a file."""
    return tiny_bert_inputs(tmp_path_factory.mktemp("mk"), 1, {"vocab.txt": "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"})


def write_yaml(path, data) -> object:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def weights(folder) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def models(hf, params_a: dict, params_b: dict | None = None, params_c: dict | None = None) -> list[dict]:
    return [
        {"model": f"{hf['pack']}#a", "parameters": params_a},
        {"model": f"{hf['pack']}#b", "parameters": params_b if params_b is not None else params_a},
        {"model": str(hf["ft"]["c"]), "parameters": params_c if params_c is not None else params_a},
    ]


# mergekit YAML -> the tvq flags it means (mergekit's defaults: λ 1, per-tensor top-k, its normalize)
CASES = {
    "ties": (
        {"merge_method": "ties", "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float16"},
        {"density": 0.5, "weight": 1.0},
        ["--method", "ties", "--scope", "tensor", "--density", "0.5", "--lambda", "1.0", "--aggregate", "mean", "--dtype", "float16"],
    ),
    "ties_unnormalized_weight": (
        {"merge_method": "ties", "parameters": {"normalize": False, "lambda": 0.5}},
        {"density": 0.3, "weight": 0.6},
        ["--method", "ties", "--scope", "tensor", "--density", "0.3", "--lambda", "0.5", "--aggregate", "sum", "--weight", "0.6"],
    ),
    "dare_ties": (
        {"merge_method": "dare_ties", "parameters": {"lambda": 0.7}},
        {"density": 0.6, "weight": 1.0},
        ["--method", "dare_ties", "--drop-rate", str(1.0 - 0.6), "--density", "1.0", "--scope", "tensor",
         "--aggregate", "sum", "--rescale-mode", "l1", "--lambda", "0.7"],
    ),  # fmt: skip
    "dare_linear": (
        {"merge_method": "dare_linear", "parameters": {"rescale": False}},
        {"density": 0.5, "weight": 1.0},
        ["--method", "dare", "--base", "task_arithmetic", "--drop-rate", "0.5", "--no-rescale", "--rescale-mode", "l1", "--lambda", "1.0"],
    ),
    "breadcrumbs_ties": (
        {"merge_method": "breadcrumbs_ties"},
        {"density": 0.4, "gamma": 0.05, "weight": 1.0},
        ["--method", "breadcrumbs_ties", "--scope", "tensor", "--density", "0.4", "--gamma", "0.05", "--lambda", "1.0", "--aggregate", "sum"],
    ),
    "breadcrumbs": (
        {"merge_method": "breadcrumbs", "parameters": {"normalize": True}},
        {"density": 0.4, "weight": 2.0},
        ["--method", "breadcrumbs", "--scope", "tensor", "--density", "0.4", "--gamma", "0.01", "--lambda", str(2.0 / 6.0)],
    ),
    "model_stock": (
        {"merge_method": "model_stock", "parameters": {"filter_wise": True}},
        None,
        ["--method", "model_stock", "--filter-wise"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mergekit_yaml_gives_the_bytes_of_the_tvq_flags(hf, tmp_path, case):
    top, params, flags = CASES[case]
    entries = models(hf, params) if params is not None else [{"model": m["model"]} for m in models(hf, {})]
    cfg = write_yaml(tmp_path / "merge.yml", {"models": entries, **top, "base_model": str(hf["pre"])})
    ok(run("--config", cfg, "--out", tmp_path / "yaml"))
    ok(run(*flags, "--pretrained", hf["pre"], "--pack", hf["pack"], "--finetuned", f"c={hf['ft']['c']}", "--out", tmp_path / "flags"))
    assert weights(tmp_path / "yaml") == weights(tmp_path / "flags")
    assert (tmp_path / "yaml" / "mergekit_config.yml").read_text() == cfg.read_text()  # kept beside the model


def test_per_model_weights_della_and_task_arithmetic(hf, tmp_path):
    della = {"merge_method": "della", "base_model": str(hf["pre"]), "parameters": {"lambda": 1.0},
             "models": models(hf, {"weight": 1.0, "density": 0.6, "epsilon": 0.1}, {"weight": 0.5, "density": 0.7, "epsilon": 0.1},
                              {"weight": 0.25, "density": 0.6, "epsilon": 0.05})}  # fmt: skip
    ok(run("--config", write_yaml(tmp_path / "della.yml", della), "--out", tmp_path / "della_yaml"))
    ok(run("--method", "della", "--weight", "{a: 1.0, b: 0.5, c: 0.25}", "--density", "{a: 0.6, b: 0.7, c: 0.6}",
           "--epsilon", "{a: 0.1, b: 0.1, c: 0.05}", "--lambda", "1.0", "--rescale-mode", "l1",
           "-p", hf["pre"], "--pack", hf["pack"], "-f", f"c={hf['ft']['c']}", "--out", tmp_path / "della_flags"))  # fmt: skip
    assert weights(tmp_path / "della_yaml") == weights(tmp_path / "della_flags")

    ties = {"merge_method": "ties", "base_model": str(hf["pre"]),
            "models": models(hf, {"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}, {"weight": 2.0, "density": 0.3})}  # fmt: skip
    ok(run("--config", write_yaml(tmp_path / "ties.yml", ties), "--out", tmp_path / "ties_yaml"))
    ok(run("--method", "ties", "--scope", "tensor", "--weight", "{a: 1.0, b: 0.5, c: 2.0}", "--density", "{a: 0.3, b: 0.6, c: 0.3}",
           "--lambda", "1", "-p", hf["pre"], "--pack", hf["pack"], "-f", f"c={hf['ft']['c']}", "--out", tmp_path / "ties_flags"))  # fmt: skip
    assert weights(tmp_path / "ties_yaml") == weights(tmp_path / "ties_flags")

    ta = {"merge_method": "task_arithmetic", "base_model": str(hf["pre"]), "parameters": {"lambda": 0.8},
          "models": models(hf, {"weight": 0.3}, {"weight": 0.7}, {"weight": 1.2})}  # fmt: skip
    ok(run("--config", write_yaml(tmp_path / "ta.yml", ta), "--out", tmp_path / "ta_yaml"))
    ok(run("--method", "task_arithmetic", "--weight", "{a: 0.3, b: 0.7, c: 1.2}", "--lambda", "0.8",
           "-p", hf["pre"], "--pack", hf["pack"], "-f", f"c={hf['ft']['c']}", "--out", tmp_path / "ta_flags"))  # fmt: skip
    assert weights(tmp_path / "ta_yaml") == weights(tmp_path / "ta_flags")
    # and it is what the weights mean: θ_pre + 0.8 Σ w_t τ̂_t
    from tvq.merge import load_task_vectors

    pre, vectors = load_task_vectors(hf["pre"], packs=[hf["pack"]], finetuned={"c": hf["ft"]["c"]})
    key = "encoder.layer.0.attention.self.query.weight"
    expected = pre.get(key) + 0.8 * (0.3 * vectors["a"][key] + 0.7 * vectors["b"][key] + 1.2 * vectors["c"][key])
    assert torch.allclose(load_file(tmp_path / "ta_yaml" / "model.safetensors")[key], expected, atol=1e-6)


def test_linear_without_base_model_is_the_weighted_mean_of_the_models(hf, tmp_path):
    """mergekit's README example shape: linear, no base_model, normalize on by default."""
    cfg = {"models": [{"model": str(hf["ft"][n]), "parameters": {"weight": w}} for n, w in (("a", 1.0), ("b", 0.3), ("c", 0.5))],
           "merge_method": "linear", "dtype": "float32"}  # fmt: skip
    ok(run("--config", write_yaml(tmp_path / "linear.yml", cfg), "--out", tmp_path / "lin.safetensors"))
    got = load_file(tmp_path / "lin.safetensors")
    thetas = {n: load_file(hf["ft"][n]) for n in "abc"}
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.bias"):
        expected = (1.0 * thetas["a"][key] + 0.3 * thetas["b"][key] + 0.5 * thetas["c"][key]) / 1.8
        assert torch.allclose(got[key], expected, atol=1e-6), key
    # the same bytes as the flags it stands for (the first model is the base; its task vector is zero)
    ok(run("--method", "task_arithmetic", "--weight", "{a: 1.0, b: 0.3, c: 0.5}", "--normalize", "--lambda", "1.0", "--dtype", "float32",
           "-p", hf["ft"]["a"], *[x for n in "abc" for x in ("-f", f"{n}={hf['ft'][n]}")], "--out", tmp_path / "flags.safetensors"))  # fmt: skip
    assert (tmp_path / "lin.safetensors").read_bytes() == (tmp_path / "flags.safetensors").read_bytes()


def test_a_whole_pack_is_every_task_with_the_entry_parameters_and_flags_override(hf, tmp_path):
    cfg = {"merge_method": "ties", "base_model": str(hf["pre"]),
           "models": [{"model": str(hf["pack"]), "parameters": {"weight": 1, "density": 0.2}}]}  # fmt: skip
    ok(run("--config", write_yaml(tmp_path / "m.yml", cfg), "--out", tmp_path / "yaml", "--lambda", "0.4"))  # a flag overrides
    ok(run("--method", "ties", "--scope", "tensor", "--density", "0.2", "--lambda", "0.4", "-p", hf["pre"], "--pack", hf["pack"],
           "--out", tmp_path / "flags"))  # fmt: skip
    assert weights(tmp_path / "yaml") == weights(tmp_path / "flags")


def test_the_recipe_in_a_merged_folder_merges_the_same_bytes(hf, tmp_path):
    ok(run("--method", "dare_ties", "--density", "0.3", "--seed", "5", "-p", hf["pre"], "--pack", hf["pack"],
           "-f", f"c={hf['ft']['c']}", "--out", tmp_path / "first"))  # fmt: skip
    recipe = tmp_path / "first" / "tvq_recipe.yml"
    data = yaml.safe_load(recipe.read_text())
    assert data["method"] == "dare_ties" and data["options"]["seed"] == 5 and data["tasks"] == ["a", "b", "c"]
    ok(run("--config", recipe, "--out", tmp_path / "again"))
    assert weights(tmp_path / "first") == weights(tmp_path / "again")


def test_today_s_tvq_config_keeps_working(hf, tmp_path):
    cfg = write_yaml(tmp_path / "old.yaml", {"method": "ties", "options": {"density": 0.3}, "lambda": 0.5})
    ok(run("--config", cfg, "-p", hf["pre"], "--pack", hf["pack"], "--out", tmp_path / "old.safetensors"))
    ok(run("--method", "ties", "--density", "0.3", "--lambda", "0.5", "-p", hf["pre"], "--pack", hf["pack"], "--out", tmp_path / "new.safetensors"))
    assert (tmp_path / "old.safetensors").read_bytes() == (tmp_path / "new.safetensors").read_bytes()


def test_a_quantize_and_merge_pipeline_in_one_file(hf, tmp_path):
    pack = tmp_path / "packs" / "tvq3"
    pipeline = {
        "quantize": {"pretrained": str(hf["pre"]), "finetuned": {"a": str(hf["ft"]["a"]), "b": str(hf["ft"]["b"])}, "bits": 3, "out": str(pack)},
        "merge_method": "ties",
        "base_model": str(hf["pre"]),
        "models": [{"model": f"{pack}#a", "parameters": {"weight": 1.0, "density": 0.3}},
                   {"model": f"{pack}#b", "parameters": {"weight": 1.0, "density": 0.3}}],
    }  # fmt: skip
    result = run("--config", write_yaml(tmp_path / "pipeline.yml", pipeline), "--out", tmp_path / "piped")
    ok(result)
    assert "TVQ INT3" in result.output
    quantized = runner.invoke(app, ["quantize", "-p", str(hf["pre"]), "-f", f"a={hf['ft']['a']}", "-f", f"b={hf['ft']['b']}",
                                    "--bits", "3", "--out", str(tmp_path / "by_hand"), "--no-progress"])  # fmt: skip
    ok(quantized)
    ok(run("--method", "ties", "--scope", "tensor", "--density", "0.3", "--lambda", "1", "-p", hf["pre"], "--pack", tmp_path / "by_hand",
           "--out", tmp_path / "stepwise"))  # fmt: skip
    assert weights(tmp_path / "piped") == weights(tmp_path / "stepwise")
    card = (tmp_path / "piped" / "README.md").read_text()
    assert "TVQ INT3" in card


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}]}], "models": None}, ["merge.yml", "slices", "not supported"]),
        ({"tokenizer_source": "union"}, ["merge.yml", "tokenizer_source", "'union'"]),
        ({"merge_method": "slerp"}, ["merge.yml", "merge_method", "'slerp'", "ties"]),
        ({"parameters": {"density": [0.1, 0.5]}}, ["merge.yml", "parameters.density", "gradients"]),
        ({"parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1}]}}, ["merge.yml", "filtered by tensor name"]),
        ({"parameters": {"epsilon": 0.1}}, ["merge.yml", "parameters.epsilon", "not a parameter of mergekit's ties"]),
        ({"parameters": {"rescale": True}}, ["merge.yml", "parameters.rescale", "not in tvq's ties"]),
        ({"dtype": "int8"}, ["merge.yml", "dtype", "'int8'"]),
        ({"colour": "red"}, ["merge.yml", "colour", "not a field of a mergekit config"]),
        ({"base_model": None}, ["merge.yml", "base_model", "missing"]),
        ({"models": "per_model_gamma"}, ["merge.yml", "models[].parameters.gamma", "density + gamma = 1.1 > 1 for b"]),
        ({"models": "lambda_per_model"}, ["merge.yml", "models[0].parameters.lambda", "global parameter"]),
        ({"models": "no_weight"}, ["merge.yml", "models[0].parameters.weight", "required"]),
    ],
)
def test_what_tvq_cannot_honour_is_one_line(hf, tmp_path, change, fragments):
    cfg = {"merge_method": "ties", "base_model": str(hf["pre"]), "models": models(hf, {"weight": 1.0, "density": 0.2})}
    special = change.get("models")
    if special == "per_model_gamma":
        change = {"merge_method": "breadcrumbs_ties", "models": models(hf, {"weight": 1.0, "density": 0.2, "gamma": 0.01},
                                                                       {"weight": 1.0, "density": 0.2, "gamma": 0.9})}  # fmt: skip
    elif special == "lambda_per_model":
        change = {"models": models(hf, {"weight": 1.0, "lambda": 0.5})}
    elif special == "no_weight":
        change = {"models": models(hf, {"density": 0.5})}
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None or k == "base_model"}
    if cfg.get("base_model") is None:
        cfg.pop("base_model")
    result = run("--config", write_yaml(tmp_path / "merge.yml", cfg), "--out", tmp_path / "o")
    one_line_error(result, *fragments)
    assert not (tmp_path / "o").exists()


def test_linear_without_normalize_must_keep_the_models_scale(hf, tmp_path):
    entries = [{"model": str(hf["ft"][n]), "parameters": {"weight": 0.7}} for n in "ab"]
    cfg = {"merge_method": "linear", "parameters": {"normalize": False}, "models": entries}
    one_line_error(run("--config", write_yaml(tmp_path / "merge.yml", cfg), "--out", tmp_path / "o"), "parameters.normalize", "sum to 1.4")


def test_settings_that_are_one_value_everywhere_are_accepted(tmp_path):
    assert setting_value([0.5, 0.5, 0.5], "f", tmp_path) == 0.5
    assert setting_value([{"value": 0.3}], "f", tmp_path) == 0.3
    assert setting_value({"filter": "*", "value": 2}, "f", tmp_path) == 2


def test_a_typo_in_a_global_flag_is_named_as_such(hf, tmp_path):
    line = one_line_error(run("--method", "ties", "-p", hf["pre"], "--pack", hf["pack"], "--out", tmp_path / "o", "--overwite"),
                          "unknown flag --overwite", "did you mean --overwrite?")  # fmt: skip
    assert "merge method" not in line
    one_line_error(run("--method", "ties", "-p", hf["pre"], "--pack", hf["pack"], "--out", tmp_path / "o", "--densty", "0.3"),
                   "merge method 'ties': unknown option --densty (did you mean --density?)")  # fmt: skip
    one_line_error(run("--method", "ties", "-p", hf["pre"], "--pack", hf["pack"], "--out", tmp_path / "o", "--max-shard-sise", "1MB"),
                   "did you mean --max-shard-size?")  # fmt: skip
    # far from everything: the method's own message, with its options
    one_line_error(run("--method", "ties", "-p", hf["pre"], "--pack", hf["pack"], "--out", tmp_path / "o", "--zzz", "1"),
                   "unknown option 'zzz'", "valid options: density")  # fmt: skip


def test_help_shows_each_method_option_with_type_default_and_meaning():
    result = runner.invoke(app, ["merge", "--help"], terminal_width=250)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--gamma FLOAT|{TASK: FLOAT} (default 0.01): fraction of largest magnitudes removed" in text
    assert "--density FLOAT|{TASK: FLOAT} (default 0.2): fraction of each task vector kept" in text
    assert "--scope global|tensor (default global)" in text
    assert "--weight FLOAT|{TASK: FLOAT} (default 1.0): weight of each task vector" in text
    assert "--normalize/--no-normalize (default False)" in text
    assert "--coefficients PATH (required)" in text
    assert "mergekit's YAML" in text
    assert "--out-kind" in text


def test_json_config_and_unknown_recipe_keys(hf, tmp_path):
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({"method": "ties", "pretrained": str(hf["pre"]), "packs": [str(hf["pack"])], "tasks": ["b", "zz"]}))
    one_line_error(run("--config", cfg, "--out", tmp_path / "o"), "task 'zz' is in none of the inputs")
    cfg.write_text(json.dumps({"method": "ties", "packs": "not-a-list"}))
    one_line_error(run("--config", cfg, "--out", tmp_path / "o"), "m.json", "packs")


def mergekit_ties(taus: list[list[float]], weights: list[float], densities: list[float], normalize: bool) -> torch.Tensor:
    """mergekit's generalized task arithmetic with magnitude sparsification and sum consensus, written
    out from mergekit/merge_methods/generalized_task_arithmetic.py and mergekit/sparsify.py."""
    deltas = []
    for tau, d in zip(taus, densities, strict=True):
        t = torch.tensor(tau)
        k = int(d * t.numel())
        mask = torch.zeros_like(t)
        mask[torch.argsort(t.abs(), descending=True)[:k]] = 1
        deltas.append(t * mask)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights).unsqueeze(-1)
    weighted = stacked * w
    majority = (weighted.sum(dim=0) >= 0).float() * 2 - 1
    mask = weighted.sign() == majority
    mixed = (weighted * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed / divisor if normalize else mixed


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_with_per_task_weights_and_densities_is_mergekit_s(normalize):
    from tvq.merge import merge_state_dict

    from merge_helpers import tv

    taus = [[0.9, -0.1, 0.35, -0.6, 0.05, 0.2], [-0.8, 0.3, 0.15, -0.25, 0.7, -0.45], [0.11, -0.52, 0.4, 0.65, -0.02, 0.33]]
    weights, densities = [1.0, 0.5, 2.0], [0.67, 0.84, 0.67]
    expected = mergekit_ties(taus, weights, densities, normalize)
    got = merge_state_dict(
        "ties", {"w": torch.zeros(6)}, {f"t{i}": tv(w=t) for i, t in enumerate(taus)},
        {"scope": "tensor", "lambda": 1.0, "aggregate": "mean" if normalize else "sum",
         "weight": {f"t{i}": w for i, w in enumerate(weights)}, "density": {f"t{i}": d for i, d in enumerate(densities)}},
    )["w"]  # fmt: skip
    assert torch.allclose(got, expected, atol=1e-7), (got, expected)
    assert not torch.equal(got, mergekit_ties(taus, [1.0] * 3, densities, normalize))  # the weights matter


def test_ties_density_per_task_needs_scope_tensor_and_unit_weights_keep_the_paper_path():
    from tvq.errors import ConfigError
    from tvq.merge import merge_state_dict

    from merge_helpers import tv

    vectors = {"a": tv(w=[0.3, -0.2, 0.1, 0.0]), "b": tv(w=[-0.1, 0.4, 0.2, -0.3])}
    with pytest.raises(ConfigError, match="density per task needs scope=tensor"):
        merge_state_dict("ties", {"w": torch.zeros(4)}, vectors, {"density": {"a": 0.5, "b": 0.25}})
    with pytest.raises(ConfigError, match="invalid value for 'density': Input should be less than or equal to 1 \\(got 1.5\\)"):
        merge_state_dict("ties", {"w": torch.zeros(4)}, vectors, {"density": {"a": 0.5, "b": 1.5}, "scope": "tensor"})
    with pytest.raises(ConfigError, match="weight must name every task exactly"):
        merge_state_dict("ties", {"w": torch.zeros(4)}, vectors, {"weight": {"a": 0.5}})
    plain = merge_state_dict("ties", {"w": torch.zeros(4)}, vectors, {"density": 0.5})
    unit = merge_state_dict("ties", {"w": torch.zeros(4)}, vectors, {"density": {"a": 0.5, "b": 0.5}, "weight": 1.0})
    assert torch.equal(plain["w"], unit["w"])
