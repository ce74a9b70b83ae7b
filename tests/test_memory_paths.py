"""The LLM-scale paths: private reads instead of mmap, memory-aware admission, fp32 statistics."""

from __future__ import annotations

import threading
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tvq.encode import mean_of, sq_error
from tvq.execute import LocalExecutor
from tvq.io.readers import SafetensorsFile


def test_safetensors_file_reads_what_safe_open_reads(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7, dtype=torch.int64), "e": torch.empty(0, 4), "m": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as ref:
        for key in tensors:
            got = f.get_tensor(key)
            assert got.dtype == tensors[key].dtype and torch.equal(got, ref.get_tensor(key))
    got = f.get_tensor("a")
    got += 1  # a private buffer: writing to it changes no later read
    assert torch.equal(f.get_tensor("a"), tensors["a"])


class _Job:
    def __init__(self, cost: int) -> None:
        self.cost = cost

    def memory_estimate(self) -> int:
        return self.cost


def test_executor_runs_a_job_over_budget_alone_and_keeps_order():
    running: list[int] = []
    peak = []
    lock = threading.Lock()

    def fn(job: _Job) -> int:
        with lock:
            running.append(job.cost)
            peak.append(sum(running))
        time.sleep(0.02)
        with lock:
            running.remove(job.cost)
        return job.cost

    costs = [10, 10, 100, 10, 10, 10]
    out = list(LocalExecutor(threads=2, memory_budget=30).map(fn, [_Job(c) for c in costs]))
    assert out == costs
    assert max(peak) <= 100  # the big job never overlapped another


def test_sq_error_and_mean_match_the_fp64_reference():
    g = torch.Generator().manual_seed(0)
    tau, a, b = (torch.randn(3_000_001, generator=g) for _ in range(3))
    err, ref = sq_error(tau, a, b)
    assert abs(err / float((a + b - tau).double().pow(2).sum()) - 1) < 1e-5
    assert abs(ref / float(tau.double().pow(2).sum()) - 1) < 1e-5
    xs = [torch.randn(1000, generator=g).bfloat16() for _ in range(3)]
    expected = sum((torch.zeros(1000), *(x.float() for x in xs)), torch.zeros(1000)) / 3
    assert torch.equal(mean_of(xs), expected)


def test_executor_backfills_past_a_job_that_does_not_fit_and_keeps_order():
    """A big job waiting for budget must not leave a thread idle: later small jobs start
    meanwhile (and are still returned in order)."""
    started: list[int] = []
    lock = threading.Lock()

    def fn(job: _Job) -> int:
        with lock:
            started.append(job.cost)
        time.sleep(0.2 if job.cost >= 60 else 0.02)
        return job.cost

    costs = [60, 60, 1, 2, 3, 4]  # the two big jobs cannot run side by side under a budget of 100
    out = list(LocalExecutor(threads=2, memory_budget=100).map(fn, [_Job(c) for c in costs]))
    assert out == costs
    assert started.index(1) < started.index(60, 1)  # small jobs ran beside the first big one
