"""Executors: run per-tensor jobs locally or on a Ray cluster, results back in order.

The driver consumes results in submission order and writes them, so outputs do not depend
on the executor. A bounded window of jobs in flight, admitted by their memory estimates,
keeps memory bounded whatever the model size.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from tvq import heap
from tvq.errors import ConfigError, TvqError

DEFAULT_BUDGET = 2 << 30

J = TypeVar("J")
R = TypeVar("R")


class Executor(Protocol):
    remote: bool  # jobs leave this process (they must carry paths, not open files)

    def map(self, fn: Callable[[J], R], jobs: Iterable[J]) -> Iterator[R]: ...


def memory_limit() -> int:
    """Bytes this process may use: its cgroup's limit (v1 or v2) if any, else physical RAM."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return limit
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            candidates = [Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / "memory.limit_in_bytes"]
        elif controllers == "":
            candidates = [Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max"]
        else:
            continue
        for file in candidates:
            try:
                text = file.read_text().strip()
            except OSError:
                continue
            if text.isdigit():
                limit = min(limit, int(text))
    return limit


def job_cost(job: object) -> int:
    """A job's memory estimate in bytes (0 when it carries none)."""
    estimate = getattr(job, "memory_estimate", None)
    return int(estimate()) if callable(estimate) else 0


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Workers run torch ops single-threaded and parallelise across tensors instead: on a
    busy machine, OpenMP barriers per chunk-sized op cost milliseconds each (measured 100x
    slower chunk loops with 2 intra-op threads and another job running). The setting is
    process-wide in torch, so the caller's value is restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class LocalExecutor:
    """In-process; ``threads > 1`` runs jobs on worker threads (torch and hashlib release the
    GIL). Results come back in job order, but jobs start out of order: when the next job does
    not fit the memory budget beside those running, a later one that does starts first
    (backfilling, within a window of ``lookahead`` jobs), so one big tensor does not leave
    the other threads idle. Admission is memory-aware: a job is not started while the
    estimates of the running jobs, plus the bytes of finished results not yet taken, plus
    its own exceed ``memory_budget`` (default: a quarter of the memory limit, cgroup
    included, at most 2 GiB), unless nothing else runs, so a big tensor is encoded alone."""

    remote = False

    def __init__(self, threads: int = 1, memory_budget: int | None = None, lookahead: int | None = None) -> None:
        self.threads = max(1, threads)
        self.memory_budget = memory_budget if memory_budget is not None else min(memory_limit() // 4, DEFAULT_BUDGET)
        self.lookahead = lookahead or 8 * self.threads

    def map(self, fn: Callable[[J], R], jobs: Iterable[J]) -> Iterator[R]:
        if self.threads == 1:
            for job in jobs:
                yield fn(job)
                heap.release()  # the job's freed memory, back before the next (tvq.heap)
            return
        with one_torch_thread(), ThreadPoolExecutor(self.threads) as pool:
            yield from _Backfill(pool, fn, jobs, self.threads, self.memory_budget, self.lookahead).results()


class _Slot:
    """One job of the window: its memory estimate, and its future once started."""

    def __init__(self, job: object) -> None:
        self.job, self.cost = job, job_cost(job)
        self.future: Future | None = None
        self.held = 0  # bytes counted against the budget: the estimate while running, then the result's


class _Backfill:
    """The scheduling state of one ``LocalExecutor.map`` call."""

    def __init__(self, pool: ThreadPoolExecutor, fn: Callable, jobs: Iterable, threads: int, budget: int, lookahead: int) -> None:
        self.pool, self.fn, self.jobs = pool, fn, iter(jobs)
        self.threads, self.budget, self.lookahead = threads, budget, lookahead
        self.window: deque[_Slot] = deque()
        self.running: set[Future] = set()
        self.held = 0

    def results(self) -> Iterator:
        while self._fill():
            self._start_what_fits()
            head = self.window[0]
            if head.future is not None and head.future.done():
                self.window.popleft()
                self._settle(head)
                self.held -= head.held
                yield head.future.result()
                heap.release()  # what the caller freed of the previous result
                continue
            done, _ = wait(self.running, return_when=FIRST_COMPLETED)
            for slot in self.window:
                if slot.future in done:
                    self._settle(slot)

    def _fill(self) -> bool:
        while len(self.window) < self.lookahead:
            job = next(self.jobs, _END)
            if job is _END:
                break
            self.window.append(_Slot(job))
        return bool(self.window)

    def _start_what_fits(self) -> None:
        for slot in self.window:
            if len(self.running) >= self.threads:
                return
            if slot.future is None and (not self.running or self.held + slot.cost <= self.budget):
                slot.future = self.pool.submit(_released, self.fn, slot.job)
                slot.held = slot.cost
                self.held += slot.cost
                self.running.add(slot.future)

    def _settle(self, slot: _Slot) -> None:
        """A finished job stops counting its estimate and counts its result's bytes instead."""
        if slot.future not in self.running or not slot.future.done():
            return
        self.running.discard(slot.future)
        if slot.future.exception() is None:
            result_bytes = int(getattr(slot.future.result(), "nbytes", slot.cost))
            self.held += result_bytes - slot.held
            slot.held = result_bytes


_END = object()


def _released(fn: Callable[[J], R], job: J) -> R:
    """``fn(job)`` on a worker, then the memory it freed back to the system (``tvq.heap``)."""
    try:
        return fn(job)
    finally:
        heap.release()


class RayExecutor:
    """Ray tasks, one per tensor; inputs are read by the workers from their paths, so on a
    real cluster the checkpoints must be on storage every node can see (NFS, a bucket
    mount). Start with ``ray start --head`` and pass ``--address HOST:6379``."""

    remote = True

    def __init__(self, address: str | None = None, window: int = 8, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'tvq[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"num_cpus": num_cpus}
            ray.init(ignore_reinit_error=True, log_to_driver=False, **kwargs)
        self.window = window

    def map(self, fn: Callable[[J], R], jobs: Iterable[J]) -> Iterator[R]:
        ray = self._ray
        remote = ray.remote(fn)
        pending: deque = deque()

        def take():
            ref = pending.popleft()
            try:
                return ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, TvqError):
                    raise cause from None
                raise

        for job in jobs:
            pending.append(remote.remote(job))
            if len(pending) >= self.window:
                yield take()
        while pending:
            yield take()


def make_executor(name: str = "local", address: str | None = None, threads: int = 1) -> Executor:
    if name == "local":
        return LocalExecutor(threads)
    if name == "ray":
        return RayExecutor(address)
    raise ConfigError(f"unknown executor {name!r}; valid: local, ray")
