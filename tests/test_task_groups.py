"""A large TVQ tensor of many tasks is encoded in jobs of a few tasks each (issue 19: quantize
memory independent of T): the same pack, byte for byte, the same errors, θ_pre hashed once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tvq import QuantizeOptions, quantize
from tvq.encode import job as job_module
from tvq.encode.incremental import add_tasks
from tvq.encode.job import KeyJob, task_groups
from tvq.errors import CheckpointError
from tvq.execute import LocalExecutor
from tvq.quant.selection import TensorRole

T = 6


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def six(tmp_path: Path) -> dict:
    """Pretrained + 6 fine-tuned models: a bf16 matrix large enough for the compiled kernels, an
    fp32 one, a bias."""
    g = torch.Generator().manual_seed(0)
    pre = {"big.weight": torch.randn(300, 256, generator=g).bfloat16(), "small.weight": torch.randn(40, 30, generator=g),
           "small.bias": torch.randn(40, generator=g)}  # fmt: skip
    save_file(pre, tmp_path / "pre.safetensors")
    paths = {}
    for t in range(T):
        ft = {k: (v.float() + 0.01 * (t + 1) * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in pre.items()}
        paths[f"task{t}"] = tmp_path / f"task{t}.safetensors"
        save_file(ft, paths[f"task{t}"])
    return {"dir": tmp_path, "pre": tmp_path / "pre.safetensors", "fts": paths}


def _grouped(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setattr(job_module, "GROUPED_NUMEL", 0 if on else 1 << 62)


@pytest.mark.parametrize("options", [QuantizeOptions(bits=4), QuantizeOptions(bits=2, entropy="off"), QuantizeOptions(bits=3, entropy="max")])
@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_jobs_write_the_same_pack(six: dict, monkeypatch: pytest.MonkeyPatch, options: QuantizeOptions, threads: int) -> None:
    out = six["dir"]
    _grouped(monkeypatch, False)
    whole = quantize(six["pre"], six["fts"], out / "whole", options, progress=False)
    _grouped(monkeypatch, True)
    split = quantize(six["pre"], six["fts"], out / "split", options, progress=False, executor=LocalExecutor(threads))
    assert _files(out / "whole") == _files(out / "split")  # codes, manifest (errors, input digests) and card
    assert whole.bytes_read == split.bytes_read  # θ_pre counted once


def test_only_streamed_tvq_of_many_tasks_is_split(six: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_module, "GROUPED_NUMEL", 300 * 256)  # big.weight's size: small.weight (40 x 30) stays whole
    fts = {n: str(p) for n, p in six["fts"].items()}
    job = KeyJob("big.weight", TensorRole.QUANTIZE, str(six["pre"]), fts, QuantizeOptions(bits=2).validated())
    groups = task_groups(job)
    assert [list(g.finetuned) for g in groups] == [["task0", "task1", "task2", "task3"], ["task4", "task5"]]
    assert [g.first_group for g in groups] == [True, False]
    assert len(task_groups(replace(job, key="small.weight"))) == 1  # a small tensor stays one job
    rtvq = QuantizeOptions(bits=2, residual=True, base_bits=3, error_correction=True).validated()
    assert len(task_groups(KeyJob("big.weight", TensorRole.QUANTIZE, str(six["pre"]), fts, rtvq))) == 1  # the base needs all
    kept = KeyJob("small.bias", TensorRole.KEEP, str(six["pre"]), fts, QuantizeOptions(bits=2).validated())
    assert len(task_groups(kept)) == 1


def test_adding_many_tasks_in_groups_is_the_same(six: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out, first = six["dir"], dict(list(six["fts"].items())[:1])
    rest = dict(list(six["fts"].items())[1:])
    quantize(six["pre"], first, out / "one", QuantizeOptions(bits=4), progress=False)
    _grouped(monkeypatch, False)
    add_tasks(out / "one", rest, out=out / "whole", pretrained=six["pre"], progress=False)
    _grouped(monkeypatch, True)
    add_tasks(out / "one", rest, out=out / "split", pretrained=six["pre"], progress=False)
    assert _files(out / "whole") == _files(out / "split")


def test_a_bad_task_in_a_later_group_is_named(six: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    bad = load_file(six["fts"]["task5"])
    bad["big.weight"][7, 3] = float("nan")
    save_file(bad, six["fts"]["task5"])
    _grouped(monkeypatch, True)
    with pytest.raises(CheckpointError, match=r"task5\.safetensors.*big\.weight"):
        quantize(six["pre"], six["fts"], six["dir"] / "bad", QuantizeOptions(bits=4), progress=False)
    assert not (six["dir"] / "bad").exists()
