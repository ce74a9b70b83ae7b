"""Executors: run per-tensor jobs locally or on a Ray cluster, results back in order.

The driver consumes results in submission order and writes them, so outputs do not depend
on the executor. A bounded window of jobs in flight, admitted by their memory estimates,
keeps memory bounded whatever the model size.
"""

from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import torch

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
    GIL). Admission is memory-aware: a job is not started while the estimates of the jobs
    in flight plus its own exceed ``memory_budget`` (default: a quarter of the memory limit,
    cgroup included, at most 2 GiB), unless nothing else runs, so a big tensor is encoded
    alone. Running two embedding-sized jobs at once buys little speed for their memory."""

    remote = False

    def __init__(self, threads: int = 1, memory_budget: int | None = None) -> None:
        self.threads = max(1, threads)
        self.memory_budget = memory_budget if memory_budget is not None else min(memory_limit() // 4, DEFAULT_BUDGET)

    def map(self, fn: Callable[[J], R], jobs: Iterable[J]) -> Iterator[R]:
        if self.threads == 1:
            for job in jobs:
                yield fn(job)
            return
        with one_torch_thread(), ThreadPoolExecutor(self.threads) as pool:
            pending: deque = deque()
            in_flight = 0
            for job in jobs:
                cost = job_cost(job)
                while pending and (len(pending) > self.threads or in_flight + cost > self.memory_budget):
                    future, done_cost = pending.popleft()
                    in_flight -= done_cost
                    yield future.result()
                pending.append((pool.submit(fn, job), cost))
                in_flight += cost
            while pending:
                yield pending.popleft()[0].result()


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
