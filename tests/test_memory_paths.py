"""The LLM-scale paths: private reads instead of mmap, memory-aware admission, fp32 statistics."""

from __future__ import annotations

import threading
from concurrent.futures import wait as real_wait

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tvq.execute import LocalExecutor
from tvq.io.readers import SafetensorsFile
from tvq.quant.chunks import mean_of, sq_error


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
    def __init__(self, index: int, cost: int, ticks: int = 1) -> None:
        self.index, self.cost, self.ticks = index, cost, ticks

    def memory_estimate(self) -> int:
        return self.cost


class _FakeClock:
    """Jobs run on the executor's real threads, but one ends only when the executor waits for
    a result: :meth:`wait`, put in place of the executor's ``concurrent.futures.wait``, first
    lets every submitted job start, then moves a fake clock to the earliest end (start + ticks)
    among the running jobs and lets that one job finish. Which job ran beside which is then
    decided by the scheduler alone, never by thread timing: the same schedule on every run."""

    def __init__(self) -> None:
        self.now = 0
        self.cond = threading.Condition()
        self.running: dict[int, tuple[_Job, int, threading.Event]] = {}
        self.spans: dict[int, tuple[int, int]] = {}  # job index -> [start, end) on the fake clock

    def run(self, job: _Job) -> int:
        release = threading.Event()
        with self.cond:
            self.running[job.index] = (job, self.now, release)
            self.cond.notify_all()
        if not release.wait(timeout=60):  # only a scheduler that never waits gets here
            raise AssertionError(f"job {job.index} was never let finish")
        return job.cost

    def wait(self, fs, return_when):
        fs = set(fs)
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.running) == len(fs), timeout=60), "a submitted job never started"
            index = min(self.running, key=lambda i: (self.running[i][1] + self.running[i][0].ticks, self.running[i][1], i))
            job, start, release = self.running.pop(index)
            self.now = start + job.ticks
            self.spans[index] = (start, self.now)
        release.set()
        return real_wait(fs, return_when=return_when)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_executor_runs_a_job_over_budget_alone_and_keeps_order(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr("tvq.execute.wait", clock.wait)
    costs = [10, 10, 100, 10, 10, 10]
    jobs = [_Job(i, c, ticks=3 if c == 100 else 1) for i, c in enumerate(costs)]
    out = list(LocalExecutor(threads=2, memory_budget=30).map(clock.run, jobs))
    assert out == costs
    assert sorted(clock.spans) == list(range(len(costs)))
    assert _overlap(clock.spans[0], clock.spans[1])  # small jobs do share the two threads
    assert not any(_overlap(clock.spans[2], span) for i, span in clock.spans.items() if i != 2)  # the big one ran alone


def test_sq_error_and_mean_match_the_fp64_reference():
    g = torch.Generator().manual_seed(0)
    tau, a, b = (torch.randn(3_000_001, generator=g) for _ in range(3))
    err, ref = sq_error(tau, a, b)
    assert abs(err / float((a + b - tau).double().pow(2).sum()) - 1) < 1e-5
    assert abs(ref / float(tau.double().pow(2).sum()) - 1) < 1e-5
    xs = [torch.randn(1000, generator=g).bfloat16() for _ in range(3)]
    expected = sum((torch.zeros(1000), *(x.float() for x in xs)), torch.zeros(1000)) / 3
    assert torch.equal(mean_of(xs), expected)


def test_executor_backfills_past_a_job_that_does_not_fit_and_keeps_order(monkeypatch):
    """A big job waiting for budget must not leave a thread idle: later small jobs start
    meanwhile (and are still returned in order)."""
    clock = _FakeClock()
    monkeypatch.setattr("tvq.execute.wait", clock.wait)
    costs = [60, 60, 1, 2, 3, 4]  # the two big jobs cannot run side by side under a budget of 100
    jobs = [_Job(i, c, ticks=5 if c >= 60 else 1) for i, c in enumerate(costs)]
    out = list(LocalExecutor(threads=2, memory_budget=100).map(clock.run, jobs))
    assert out == costs
    first, second = clock.spans[0], clock.spans[1]
    assert second[0] >= first[1]  # the second big job waited for the first
    assert all(clock.spans[i][0] < first[1] for i in range(2, 6))  # every small job ran beside the first big one
