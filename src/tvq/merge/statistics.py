"""Running statistics of a merged model: chosen, never merged (``--norm-stats``).

A merge method only ever sees task-vector entries. Running statistics (BatchNorm's
``running_mean``/``running_var``/``num_batches_tracked`` and their equivalents, found by
``tvq.normstats``) are taken whole from one of:

* ``mean``: the mean of the tasks' statistics (θ_pre + mean_t τ_t, per entry; the default for
  one merged model: it beat ``pretrained`` for every method on both BN models measured,
  docs/merging.md),
* ``pretrained``: the pretrained model's,
* ``task:NAME``: one task's own (θ_pre + τ_NAME; the default for per-task outputs such as
  EMR's ``--task``),

or re-estimated on data afterwards (``tvq.normstats.reestimate_norm_stats``), which beats all
three by far when unlabeled inputs of the tasks are at hand. Integer counters (``num_batches_tracked``)
come from the pretrained model, or from the chosen task's checkpoint when the task was given
as one (packs do not store them: they matter only while training).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from tvq.errors import ConfigError
from tvq.io.readers import CheckpointReader
from tvq.vector import TaskVector

DEFAULT_NORM_STATS = "mean"
CHOICES = "pretrained, mean or task:NAME"
Buffers = Callable[[str], "torch.Tensor | None"]  # key -> a task's own non-float tensor (checkpoints), or None


class NormStatsWarning(UserWarning):
    """The model has running statistics that the tasks changed: which ones a merge keeps matters."""


@dataclass(frozen=True)
class NormStatsChoice:
    kind: Literal["pretrained", "mean", "task"]
    task: str | None = None

    @property
    def label(self) -> str:
        return f"task:{self.task}" if self.kind == "task" else self.kind

    @classmethod
    def parse(cls, text: str, tasks: list[str]) -> NormStatsChoice:
        """``pretrained``, ``mean`` or ``task:NAME`` (NAME one of ``tasks``); one line otherwise."""
        value = str(text).strip()
        if value in ("pretrained", "mean"):
            return cls(value)  # type: ignore[arg-type]
        kind, sep, name = value.partition(":")
        if kind == "task" and sep:
            if name not in tasks:
                raise ConfigError(f"--norm-stats task:{name}: no task {name!r} in this merge (tasks: {', '.join(tasks)})")
            return cls("task", name)
        raise ConfigError(f"--norm-stats {value!r}: expected {CHOICES}")


def resolve_choice(norm_stats: str | None, tasks: list[str], task: str | None = None) -> tuple[NormStatsChoice, bool]:
    """The choice, and whether it is settled (given, or the task's own for a per-task output)
    rather than the multi-task default ``DEFAULT_NORM_STATS``, which warrants a warning."""
    if norm_stats is not None:
        return NormStatsChoice.parse(norm_stats, tasks), True
    if task is not None:
        return NormStatsChoice("task", task), True
    return NormStatsChoice.parse(DEFAULT_NORM_STATS, tasks), False


class NormStats:
    """The running statistics of one output model: which tensors they are, and their values."""

    def __init__(
        self,
        pretrained: CheckpointReader,
        vectors: Mapping[str, TaskVector],
        keys: list[str],
        choice: NormStatsChoice,
        buffers: Mapping[str, Buffers | None] | None = None,
    ) -> None:
        self.pretrained = pretrained
        self.vectors = vectors
        self.keys = list(keys)  # every statistic of the pretrained model, float or not
        self.float_keys = [k for k in self.keys if pretrained.meta(k).is_float]
        self.choice = choice
        self.buffers = dict(buffers or {})
        self.bytes_read = 0

    def _tau(self, task: str, key: str) -> torch.Tensor:
        tau = self.vectors[task][key].float()
        self.bytes_read += tau.numel() * 4
        return tau

    def value(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The output tensor of statistic ``key`` (float ones cast to ``dtype`` when given)."""
        pre = self.pretrained.get(key)  # its bytes are counted with θ_pre's (tvq.merge.engine.pass_bytes)
        if not pre.is_floating_point():
            own = self.buffers.get(self.choice.task or "") if self.choice.kind == "task" else None
            found = own(key) if own is not None else None
            return found.clone() if found is not None and found.dtype == pre.dtype and found.shape == pre.shape else pre
        kind = self.choice.kind
        if kind == "pretrained":
            out = pre
        elif kind == "task":
            assert self.choice.task is not None
            out = pre.float() + self._tau(self.choice.task, key)
        else:
            out = pre.float() + torch.stack([self._tau(t, key) for t in self.vectors]).mean(dim=0)
        return out.to(dtype or pre.dtype)

    def changed(self) -> list[str]:
        """Float statistics that some task changed (τ ≠ 0): where the choice matters."""
        return [k for k in self.float_keys if any(bool(self._tau(t, k).any()) for t in self.vectors)]

    def warning(self, changed: list[str], settled: bool) -> str | None:
        """One line when the choice matters and was left to the multi-task default: statistics the tasks changed."""
        if settled or not changed:
            return None
        tasks = len(self.vectors)
        return (
            f"{len(changed)} running statistics (e.g. {changed[0]}) differ between the {tasks} task(s) and the pretrained "
            f"model; they are never merged as weights: this model gets the {self.choice.label} ones (the default). "
            "Choose with --norm-stats pretrained|mean|task:NAME, or re-estimate them on unlabeled data of the tasks "
            "(tvq.normstats.reestimate_norm_stats), which is best when data is at hand (docs/merging.md)"
        )
