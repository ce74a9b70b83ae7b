"""Executors: run per-tensor jobs locally or on a Ray cluster, results back in order.

The driver consumes results in submission order and writes them, so outputs do not depend
on the executor. A bounded window of jobs in flight keeps memory at about
window x (tasks + 3) x the largest tensor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from tvq.errors import ConfigError, TvqError

J = TypeVar("J")
R = TypeVar("R")


class Executor(Protocol):
    remote: bool  # jobs leave this process (they must carry paths, not open files)

    def map(self, fn: Callable[[J], R], jobs: Iterable[J]) -> Iterator[R]: ...


class LocalExecutor:
    """In-process; ``threads > 1`` overlaps reading and hashing with compute (torch and
    hashlib release the GIL on large tensors)."""

    remote = False

    def __init__(self, threads: int = 1) -> None:
        self.threads = max(1, threads)

    def map(self, fn: Callable[[J], R], jobs: Iterable[J]) -> Iterator[R]:
        if self.threads == 1:
            for job in jobs:
                yield fn(job)
            return
        with ThreadPoolExecutor(self.threads) as pool:
            pending: deque = deque()
            for job in jobs:
                pending.append(pool.submit(fn, job))
                if len(pending) >= self.threads + 1:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


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
