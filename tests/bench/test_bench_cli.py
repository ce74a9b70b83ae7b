"""``tvq bench`` commands: a data table, a one-line data error, a tiny real build, the CI-sized benchmark."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tvq.bench.cli import app

from bench_helpers import write_jsonl

runner = CliRunner()


def test_data_table_for_a_jsonl_task(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "toy.jsonl")
    res = runner.invoke(app, ["data", "--tasks", f"toy={f}", "--cache", str(tmp_path / "c")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "toy" in res.output and "animals, computers" in res.output and "32" in res.output


def test_missing_package_is_one_line_and_exit_1(tmp_path: Path) -> None:
    res = runner.invoke(app, ["data", "--tasks", "fortunes", "--cache", str(tmp_path)], env={"PATH": "/nonexistent"})
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "fortunes" in lines[0] and "Traceback" not in res.output


def test_unknown_task_and_preset(tmp_path: Path) -> None:
    res = runner.invoke(app, ["data", "--tasks", "nope", "--cache", str(tmp_path)])
    assert res.exit_code == 1 and "unknown task 'nope'" in res.output
    res = runner.invoke(app, ["build", "--preset", "huge", "--cache", str(tmp_path)])
    assert res.exit_code == 2 and "unknown preset 'huge'" in res.output


def test_tiny_build_and_eval(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "toy.jsonl")
    out = tmp_path / "run"
    args = ["build", "--preset", "ci", "--tasks", f"toy={f}", "--out", str(out), "--cache", str(tmp_path / "c"), "--no-progress", "--threads", "2"]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "average" in res.output and (out / "toy" / "model.safetensors").is_file()
    res = runner.invoke(app, ["eval", str(out), str(out / "toy"), "--threads", "2"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    ft = json.loads((out / "manifest.json").read_text())["task_info"]["toy"]["finetuned"]["test"]
    assert f"{100 * ft:.1f}" in res.output


@pytest.mark.benchmark
def test_ci_benchmark_reproduces_the_papers_findings(tmp_path: Path) -> None:
    """The CI-sized benchmark, for real: 4 tasks from Debian packages (apt-get download the
    first time, cached in $TVQ_CACHE), fine-tuned MiniLM, merged from tvq packs.

    Asserts what must hold: fine-tuning beats zero-shot on every task; quantizing the
    fine-tuned weights to 4 bits (FQ) loses far more than quantizing the task vectors (TVQ);
    TVQ 4-bit task arithmetic is within a point of FP32.
    """
    from tvq.bench.matrix import Matrix

    cache = os.environ.get("TVQ_CACHE")
    args = ["build", "--preset", "ci", "--out", str(tmp_path / "ci"), "--no-progress", "--threads", "2"]
    res = runner.invoke(app, args + (["--cache", cache] if cache else []), env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ci" / "manifest.json").read_text())
    assert m["tasks"] == ["fortunes", "wn_verb", "tweets", "bing"]
    for task, info in m["task_info"].items():
        assert info["finetuned"]["test"] > info["zero_shot"]["test"], (task, info)

    matrix = Matrix(tmp_path / "ci", tmp_path / "grid", progress=False)
    matrix.run_grid(["task_arithmetic"], ["fp32", "tvq4", "fq4"], tune=False, individual=False)
    avg = {p: matrix.merged("task_arithmetic", p).avg * 100 for p in ("fp32", "tvq4", "fq4")}
    tvq_loss, fq_loss = avg["fp32"] - avg["tvq4"], avg["fp32"] - avg["fq4"]
    assert abs(tvq_loss) <= 1.0, avg
    assert fq_loss >= 5.0 and fq_loss > 5 * max(tvq_loss, 0.2), avg
    assert (tmp_path / "grid" / "results.json").is_file()


def test_bench_run_unknown_precision_is_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", "--run", str(tmp_path), "--precisions", "tvq5", "--no-progress"])
    assert res.exit_code == 2 and "unknown precision 'tvq5'" in res.output and "Traceback" not in res.output
