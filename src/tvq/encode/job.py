"""One tensor's unit of work: the job an executor runs anywhere, and what it hands back.

A job names its inputs by path (or holds open readers, for local threads), never by tensor,
so it can be shipped to a Ray worker. Its result holds the stored forms, already hashed;
the driver writes results in key order, so a pack is byte-identical whichever executor made it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TypeAlias

import torch

from tvq.encode.options import QuantizeOptions
from tvq.io.base_check import digest_line
from tvq.io.checkpoint_base import TensorMeta
from tvq.io.content_hash import DEFAULT_ALGORITHM
from tvq.io.readers import CheckpointReader, open_checkpoint
from tvq.io.stamps import input_stamp
from tvq.quant.selection import TensorRole
from tvq.quant.stored import StoredTensor

BASE = "__base__"  # file id of the RTVQ base in job results
PRETRAINED = "__pretrained__"

Source: TypeAlias = "str | Path | CheckpointReader"  # a checkpoint's path, or the reader itself


@dataclass
class KeyJob:
    """Everything needed to encode one tensor of every task."""

    key: str
    role: TensorRole
    pretrained: Source
    finetuned: dict[str, Source]
    options: QuantizeOptions
    with_average: bool = False
    base_pack: str | None = None  # adding tasks to this RTVQ pack: reuse its stored deq(Q(β))
    unsafe_pickle: bool = False
    digest_algorithm: str = DEFAULT_ALGORITHM  # of the inputs' content hashes (tvq.io.content_hash)
    device: str = "cpu"  # where the streamed min–max math runs (tvq.device); reading, hashing, writing stay on the host
    first_group: bool = True  # False for a tensor's later task groups (``task_groups``): θ_pre is hashed and counted once

    @property
    def streams(self) -> bool:
        """Whether this tensor takes the streamed path: the paper's min–max on task vectors,
        each θ_t − θ_pre formed a chunk at a time for all tasks in one pass over θ_pre
        (~3x faster). The others read each task vector whole (their estimators need it).
        Both paths keep the statistics packs have always recorded (tvq.encode.tvq)."""
        return self.role == TensorRole.QUANTIZE and self.options.streams

    @property
    def pretrained_meta(self) -> TensorMeta:
        """The pretrained tensor's dtype, shape and size, from its reader's header (nothing read)."""
        return resolve(self.pretrained, self.unsafe_pickle).meta(self.key)

    def memory_estimate(self) -> int:
        """Peak bytes of encode_key for this tensor, roughly. The streamed path holds the
        inputs as stored, the packed codes and, for RTVQ, β̂ in fp32; the other about
        (tasks + 4) fp32 copies."""
        if self.role == TensorRole.SKIP:
            return 0
        meta = self.pretrained_meta
        tasks = len(self.finetuned)
        if self.streams:
            per_element = (tasks + 1) * meta.dtype.itemsize + tasks + (4 if self.options.residual else 0)
            return meta.numel * per_element
        return meta.numel * (tasks + 4) * 4


# Tasks per job of one large tensor: the compiled kernels' group (tvq.quant.kernels), so a job's
# memory (its inputs, codes and coded bytes) no longer grows with the number of tasks.
TASK_GROUP = 4
GROUPED_NUMEL = 1 << 20  # smaller tensors stay one job: their memory is small and a job has a fixed cost


def task_groups(job: KeyJob) -> list[KeyJob]:
    """``job`` split into jobs of ``TASK_GROUP`` tasks where every task's encoding is its own
    (TVQ's streamed min–max: codes, parameters and statistics of a task do not depend on the
    others, so the pack is byte-identical), the tensor is large and there are more tasks than
    one group. RTVQ's base and the average need every task at once: those stay whole."""
    names = list(job.finetuned)
    if not job.streams or job.options.residual or job.with_average or len(names) <= TASK_GROUP or job.pretrained_meta.numel < GROUPED_NUMEL:
        return [job]
    return [replace(job, finetuned={n: job.finetuned[n] for n in names[i : i + TASK_GROUP]}, first_group=i == 0)
            for i in range(0, len(names), TASK_GROUP)]  # fmt: skip


@dataclass
class KeyCodes:
    """What a method's encoder made of one tensor: stored forms and error statistics."""

    stored: dict[str, StoredTensor] = field(default_factory=dict)  # task name or BASE -> form
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # task -> (|τ̂-τ|², |τ|²)


@dataclass
class KeyResult:
    key: str
    stored: dict[str, StoredTensor] = field(default_factory=dict)  # task name or BASE -> form
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # task -> (|τ̂-τ|², |τ|²)
    digests: dict[str, str] = field(default_factory=dict)  # input -> digest line
    average: torch.Tensor | None = None  # θ_avg (or the pretrained tensor, for non-float keys)
    bytes_read: int = 0

    @property
    def nbytes(self) -> int:
        """Memory this result holds until it is written (for the executor's budget)."""
        tensors = [self.average] + [t for s in self.stored.values() for t in (s.data, *s.aux.values())]
        return sum(t.nbytes for t in tensors if t is not None)


@lru_cache(maxsize=64)
def _open_cached(path: str, stamp: tuple[int, int], unsafe_pickle: bool) -> CheckpointReader:
    return open_checkpoint(path, unsafe_pickle)


def resolve(source: Source, unsafe_pickle: bool = False) -> CheckpointReader:
    """A reader for a path (opened once per process and file version) or the reader itself."""
    if not isinstance(source, (str, Path)):
        return source
    path = Path(source)
    return _open_cached(str(path), input_stamp(path), unsafe_pickle)


def tensor_digest(key: str, t: torch.Tensor, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """One line of an input's content hash (``tvq.io.base_check``, which merges check it with)."""
    return digest_line(key, t, algorithm)
