"""``tvq merge`` end to end: HF folders that transformers loads, configs, EMR, every bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tvq.cli import app
from tvq.merge import load_task_vectors, merge, merge_state_dict

from conftest import files_bytes, peak_rss_now, rss_shown_within, run_stats, shown
from merge_helpers import make_pack

runner = CliRunner()


def run(*args) -> object:
    return runner.invoke(app, ["merge", *map(str, args), "--no-progress"])


def ok(result) -> None:
    assert result.exit_code == 0, result.output


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = " ".join(result.output.split("error:", 1)[-1].split())
    for f in fragments:
        assert f in line, (f, line)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    """A tiny BERT saved by transformers, three fine-tuned copies, and a 4-bit TVQ pack."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, max_position_embeddings=16
    )
    model = BertModel(config)
    pre = root / "bert"
    model.save_pretrained(pre)
    (pre / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    (pre / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    state = load_file(pre / "model.safetensors")
    paths = {}
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        ft = {k: (v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in state.items()}
        paths[f"task{i}"] = root / f"task{i}.safetensors"
        save_file(ft, paths[f"task{i}"])
    ckpts = {"pre_path": pre, "ft_paths": paths}
    return {"root": root, "pre": pre, "ft": paths, "state": state, "pack": make_pack(ckpts, root / "pack", bits=4)}


def ft_args(hf) -> list[str]:
    return [a for name, p in hf["ft"].items() for a in ("--finetuned", f"{name}={p}")]


def test_hf_folder_from_a_pack_loads_with_transformers(hf, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "merged"
    ok(run("--method", "ties_merging", "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", out,
           "--density", "0.5", "--lambda", "0.4", "--scope", "tensor", "--max-shard-size", "20KB"))  # fmt: skip
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "vocab.txt").is_file() and (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()
    model = AutoModel.from_pretrained(out)
    pre, vectors = load_task_vectors(hf["pre"], packs=[hf["pack"]])
    expected = merge_state_dict("ties", pre, vectors, {"density": 0.5, "lambda": 0.4, "scope": "tensor"})
    got = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_threads_flag_and_io_memory_report(hf, tmp_path):
    """--threads gives the same folder, byte for byte; the last line reports I/O and memory."""
    r = run("--method", "ties", "--pack", hf["pack"], "--pretrained", hf["pre"], "--density", "0.3", "--out", tmp_path / "serial")
    ok(r)
    rss_before = peak_rss_now()
    r = run("--method", "ties", "--pack", hf["pack"], "--pretrained", hf["pre"], "--density", "0.3", "--out", tmp_path / "threads",
            "--executor", "local", "--threads", "2")  # fmt: skip
    rss_after = peak_rss_now()
    ok(r)
    for f in (tmp_path / "serial").iterdir():
        assert f.read_bytes() == (tmp_path / "threads" / f.name).read_bytes(), f.name
    stats = run_stats(r.output)
    assert shown(stats["wrote"], files_bytes(tmp_path / "threads"))  # shards, config and tokenizer files
    pre, vectors = load_task_vectors(hf["pre"], packs=[hf["pack"]])
    assert shown(stats["read"], merge("ties", pre, vectors, tmp_path / "api.safetensors", {"density": 0.3}).bytes_read)
    assert rss_shown_within(stats["peak_rss"], rss_before, rss_after)  # this process's, in bytes, during the run


def test_config_file_load_config_and_fp32_checkpoints(hf, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"method": "dare", "options": {"drop_rate": 0.5, "seed": 7}, "lambda": 0.5}))
    load_cfg = tmp_path / "load_config.json"
    load_cfg.write_text(json.dumps({"load_tv_type": "baseline"}))
    out = tmp_path / "m.safetensors"
    ok(run("--config", cfg, "--load-config", load_cfg, "--pretrained", hf["pre"], *ft_args(hf), "--out", out, "--seed", "3"))
    pre, vectors = load_task_vectors(hf["pre"], finetuned=hf["ft"])
    expected = merge_state_dict("dare", pre, vectors, {"drop_rate": 0.5, "seed": 3, "lambda": 0.5})  # the flag wins
    written = load_file(out)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)
    load_cfg.write_text(json.dumps({"load_tv_type": "quantized_task_vector", "load_task_bits": 4}))
    ok(run("--method", "task_arithmetic", "--load-config", load_cfg, "--pack", hf["pack"], "--pretrained", hf["pre"],
           "--out", tmp_path / "ta.safetensors"))  # fmt: skip
    load_cfg.write_text(json.dumps({"load_tv_type": "quantized_residual_task_vector", "load_task_bits": 2, "load_base_bits": 3}))
    one_line_error(run("--method", "lines", "--load-config", load_cfg, "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", tmp_path / "x"),
                   "load_tv_type 'quantized_residual_task_vector' does not match the pack", "TVQ INT4")  # fmt: skip
    load_cfg.write_text(json.dumps({"load_tv_type": "quantized_task_vector", "load_task_bits": 3}))
    r = run("--method", "lines", "--load-config", load_cfg, "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", tmp_path / "x")
    one_line_error(r, "load_task_bits=3")


def test_emr_unified_pack_then_one_task(hf, tmp_path):
    unified = tmp_path / "emr.safetensors"
    ok(run("--method", "emr_merging", "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", unified))
    direct = tmp_path / "direct"
    ok(run("--method", "emr", "--pack", hf["pack"], "--pretrained", hf["pre"], "--task", "task1", "--out", direct, "--dtype", "bfloat16"))
    via = tmp_path / "via"
    ok(run("--method", "emr", "--unified", unified, "--task", "task1", "--pretrained", hf["pre"], "--out", via, "--dtype", "bfloat16"))
    a, b = load_file(direct / "model.safetensors"), load_file(via / "model.safetensors")
    assert a.keys() == b.keys() == hf["state"].keys()
    assert a["encoder.layer.0.attention.self.query.weight"].dtype == torch.bfloat16
    assert json.loads((via / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-2) for k in a)
    one_line_error(run("--method", "emr", "--unified", unified, "--task", "nope", "--pretrained", hf["pre"], "--out", tmp_path / "n"),
                   "'nope' is not in the EMR pack", "task0, task1, task2")  # fmt: skip


def test_outputs_are_never_clobbered(hf, tmp_path):
    out = tmp_path / "m.safetensors"
    ok(run("--method", "average", "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", out))
    before = out.read_bytes()
    one_line_error(run("--method", "magmax", "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", out), "already exists", "--overwrite")
    assert out.read_bytes() == before
    ok(run("--method", "magmax", "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", out, "--overwrite"))
    r = run("--method", "average", "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", hf["pack"], "--overwrite")
    one_line_error(r, "would overwrite the input")
    one_line_error(run("--method", "average", "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", hf["pre"] / "x", "--overwrite"), "input")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--method", "slerp"], ["unknown merge method 'slerp'", "ties (ties_merging)", "consensus (tall_masks"]),
        (["--method", "ties", "--topk", "20"], ["unknown option 'topk'", "valid options: density, lambda, scope, aggregate"]),
        (["--method", "ties", "--density", "1.5"], ["invalid value for 'density'", "less than or equal to 1"]),
        (["--method", "lines", "--task", "task0"], ["--task only applies to per-task methods"]),
        (["--method", "adamerging"], ["'coefficients' is required"]),
        (["--density", "0.2"], ["no merge method"]),
        (["--method", "ties", "stray"], ["unexpected argument 'stray'"]),
    ],
)
def test_bad_method_or_options(hf, tmp_path, args, fragments):
    one_line_error(run(*args, "--pack", hf["pack"], "--pretrained", hf["pre"], "--out", tmp_path / "o"), *fragments)
    assert not (tmp_path / "o").exists()


def test_tensors_that_do_not_match_the_pretrained_model(hf, tmp_path):
    state = dict(hf["state"])
    state["pooler.dense.weight"] = torch.zeros(8, 16)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    one_line_error(run("--method", "ta", "--pretrained", hf["pre"], "--finetuned", f"bad={bad}", "--out", tmp_path / "o"),
                   "pooler.dense.weight", "shape [8, 16]")  # fmt: skip
    other = tmp_path / "other.safetensors"
    save_file({k: v for k, v in hf["state"].items() if k != "pooler.dense.bias"}, other)
    one_line_error(run("--method", "ta", "--pretrained", other, "--pack", hf["pack"], "--out", tmp_path / "o"),
                   "pooler.dense.bias", "not a float tensor of the pretrained model")  # fmt: skip
    one_line_error(run("--method", "ta", *ft_args(hf), "--out", tmp_path / "o"), "--pretrained is required")
    assert not (tmp_path / "o").exists()


def test_help_lists_methods_and_defaults():
    result = runner.invoke(app, ["merge", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "ties (ties_merging): density=0.2, lambda=0.3, scope=global" in text
    assert "lines: alpha=auto, beta=0.5" in text


def test_the_generated_methods_help_is_current():
    """`tvq merge --help` shows tvq.methods_help (no torch import); regenerate it when a method changes:
    python -c "from tvq.merge.registry import write_methods_help; write_methods_help()"."""
    from tvq.merge.registry import describe_methods
    from tvq.methods_help import TEXT

    assert describe_methods(detailed=True) == TEXT, "stale: run tvq.merge.registry.write_methods_help()"


@pytest.mark.parametrize("command", [["--help"], ["merge", "--help"], ["quantize", "--help"]])
def test_help_imports_no_torch(command):
    import subprocess
    import sys

    code = "\n".join([
        f"import sys; sys.argv = ['tvq', *{command!r}]",
        "try:\n    from tvq.cli import main; main()\nexcept SystemExit:\n    pass",
        "assert 'torch' not in sys.modules, 'torch imported'",
    ])  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
