"""A real (tiny) build on a user task, then evaluation from the run folder alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tvq.bench import BenchError
from tvq.bench.config import preset
from tvq.bench.data import jsonl_task, register_task
from tvq.bench.evaluate import adamerging_inputs, evaluate, evaluate_all, open_run, predict_logits, read_state_dict, task_logits
from tvq.bench.train import build

from bench_helpers import EXAMPLES, write_jsonl

pytestmark = pytest.mark.usefixtures("two_torch_threads")
TINY = {"train_size": 32, "val_size": 4, "test_size": 8, "max_length": 16, "epochs": 2, "batch_size": 8, "lr": 1e-4}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bench")
    register_task(jsonl_task(write_jsonl(tmp / "toy.jsonl"), name="toy"), replace=True)
    logs: list[str] = []
    build(preset("ci", tasks=["toy"], **TINY), tmp / "run", cache_dir=tmp / "cache", progress=False, log=logs.append)
    assert len(logs) == 1 and "toy: zero-shot" in logs[0]
    return tmp / "run"


def keys_of(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_layout_and_checkpoints(run_dir: Path, minilm_dir: Path) -> None:
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["format"] == "tvq-bench-run" and m["tasks"] == ["toy"] and m["preset"] == "ci"
    info = m["task_info"]["toy"]
    assert info["splits"]["sizes"] == {"train": 23, "val": 3, "test": 6}
    assert 0 <= info["zero_shot"]["test"] <= 1 and 0 <= info["finetuned"]["test"] <= 1
    assert {"head_s", "train_s", "eval_s"} <= set(info["timings"]) and isinstance(info["seed"], int)
    ref = keys_of(minilm_dir / "model.safetensors")
    assert keys_of(run_dir / "pretrained" / "model.safetensors") == ref
    assert keys_of(run_dir / "toy" / "model.safetensors") == ref  # full state dict, same keys
    assert (run_dir / "toy" / "config.json").is_file() and (run_dir / "toy" / "tokenizer.json").is_file()
    pre, ft = load_file(str(minilm_dir / "model.safetensors")), load_file(str(run_dir / "toy" / "model.safetensors"))
    assert torch.equal(pre["embeddings.word_embeddings.weight"], ft["embeddings.word_embeddings.weight"])
    assert not torch.equal(pre["encoder.layer.0.attention.self.query.weight"], ft["encoder.layer.0.attention.self.query.weight"])
    heads = load_file(str(run_dir / "heads.safetensors"))
    assert list(heads) == ["toy"] and heads["toy"].shape == (2, 384)
    assert torch.allclose(heads["toy"].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_evaluate_from_the_run_folder(run_dir: Path) -> None:
    run = open_run(run_dir)
    info = run.manifest["task_info"]["toy"]
    task = run.task("toy")
    assert evaluate(run.finetuned_path("toy"), task) == pytest.approx(info["finetuned"]["test"])
    assert evaluate(read_state_dict(run_dir / "toy"), "toy", run=run) == pytest.approx(info["finetuned"]["test"])
    assert evaluate(run.load_model(), task) == pytest.approx(info["zero_shot"]["test"])
    # a partial state dict is applied on top of the pretrained model
    partial = {k: v for k, v in read_state_dict(run_dir / "toy").items() if k.startswith("encoder.")}
    assert evaluate(partial, task) == pytest.approx(info["finetuned"]["test"])
    assert predict_logits(run.load_model(), task, "val").shape == (3, 2)
    assert predict_logits(run.load_model(), task, "validation").shape == (3, 2)  # alias
    assert set(evaluate_all(None, run)) == {"toy"}
    with pytest.raises(BenchError, match="does not"):
        run.load_model({"not.a.tensor": torch.zeros(2)})


def test_logits_are_differentiable_for_unlabeled_losses(run_dir: Path) -> None:
    run = open_run(run_dir)
    task, module = run.task("toy"), run.load_model()
    key = "encoder.layer.5.output.dense.weight"
    params = {key: module.state_dict()[key].clone().requires_grad_(True)}
    logits = task_logits(module, task, task.texts("test")[:4], params=params)
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    entropy.backward()
    assert logits.shape == (4, 2) and params[key].grad is not None and params[key].grad.abs().sum() > 0
    plain = task_logits(module, task, task.texts("test")[:4])
    assert torch.allclose(plain, logits.detach(), atol=1e-5)


def test_adamerging_hooks(run_dir: Path) -> None:
    adamerging = pytest.importorskip("tvq.merge.adamerging")
    run = open_run(run_dir)
    batches, forward = adamerging_inputs(run, batch_size=4)
    assert torch.equal(batches("toy", 3)["input_ids"], batches("toy", 3)["input_ids"])  # deterministic per step
    pre, ft = read_state_dict(run.pretrained_path), read_state_dict(run.finetuned_path("toy"))
    tv = {k: ft[k] - pre[k] for k in pre if k.startswith("encoder.layer.5.") and pre[k].is_floating_point()}
    result = adamerging.adamerging(run.load_model(), {"toy": tv}, batches, forward=forward, steps=2, lr=1e-2)
    assert len(result.losses) == 2 and all(c.shape == (1,) for c in result.coefficients.values())


def test_rerun_is_cached_and_other_settings_are_refused(run_dir: Path, tmp_path: Path) -> None:
    model_file = run_dir / "toy" / "model.safetensors"
    stamp = os.stat(model_file).st_mtime_ns
    logs: list[str] = []
    build(preset("ci", tasks=["toy"], **TINY), run_dir, cache_dir=tmp_path, progress=False, log=logs.append)
    assert "cached" in logs[0] and os.stat(model_file).st_mtime_ns == stamp
    with pytest.raises(BenchError, match="epochs: 2 -> 3"):
        build(preset("ci", tasks=["toy"], **{**TINY, "epochs": 3}), run_dir, cache_dir=tmp_path, progress=False)


def test_adding_a_task_keeps_the_built_ones(run_dir: Path, tmp_path: Path) -> None:
    register_task(jsonl_task(write_jsonl(tmp_path / "toy2.jsonl", [(t, 1 - y) for t, y in EXAMPLES]), name="toy2"), replace=True)
    logs: list[str] = []
    m = build(preset("ci", tasks=["toy2"], **TINY), run_dir, cache_dir=tmp_path, progress=False, log=logs.append)
    assert m["tasks"] == ["toy", "toy2"] and len(logs) == 1 and "toy2: zero-shot" in logs[0]
    assert list(load_file(str(run_dir / "heads.safetensors"))) == ["toy", "toy2"]
    assert open_run(run_dir).tasks == ["toy", "toy2"]


def test_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text('{"format": "tvq-pack"}')
    with pytest.raises(BenchError, match="not a benchmark run"):
        build(preset("ci", tasks=["toy"], **TINY), tmp_path / "x", cache_dir=tmp_path, progress=False)
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("mine")
    with pytest.raises(BenchError, match="not a benchmark run folder"):
        build(preset("ci", tasks=["toy"], **TINY), tmp_path / "y", cache_dir=tmp_path, progress=False)
