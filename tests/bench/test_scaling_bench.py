"""benchmarks/scaling.py on a tiny synthetic family (tvq steps only, no mergekit)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _scaling():
    spec = importlib.util.spec_from_file_location("tvq_bench_scaling", ROOT / "benchmarks" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# Two tvq CLI runs plus `tvq info`, each importing torch: about 13 CPU s, 25-31 s wall on the
# shared 2-core machine, so it runs with the other benchmarks (`pytest -m benchmark`).
@pytest.mark.benchmark
@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="run.py measures steps with /usr/bin/time -v")
def test_scaling_tiny_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = str(Path(sys.executable).parent)  # this venv's `tvq` first
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ.get("PATH", ""))
    if shutil.which("tvq") is None:
        pytest.skip("no tvq console script next to the interpreter")
    scaling = _scaling()
    out = tmp_path / "res"
    argv = ["--workdir", str(tmp_path), "--tasks", "2", "--sweep-size", "tiny", "--sizes", "tiny", "--size-tasks", "2"]
    argv += ["--methods", "task_arithmetic", "--skip-mergekit", "--no-plot", "--out", str(out)]
    assert scaling.main(argv) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    got = {(r["size"], r["tasks"], r["step"]) for r in payload["rows"]}
    assert got == {("tiny", 2, "quantize_tvq4"), ("tiny", 2, "merge_ta_tvq4")}
    for r in payload["rows"]:
        assert r["rc"] == 0 and r["wall_s"] > 0 and r["cpu_s"] > 0 and r["maxrss_mib"] > 0
        assert r["cpu_s_x_mk"] is None  # no mergekit in this run
    merged = next(r for r in payload["rows"] if r["step"] == "merge_ta_tvq4")
    assert merged["files"] and not (tmp_path / "points" / "tiny-T2" / "out" / "merge_ta_tvq4").exists()  # hashed, then deleted
    assert "| tiny | 2 | tvq quantize TVQ 4-bit |" in out.with_suffix(".md").read_text()
