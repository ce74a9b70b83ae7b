"""EMR-Merging (Huang et al. 2024): one unified vector, plus a 1-bit mask and a scalar per task.

Reference (harveyhuang18/EMR_Merging, as used in AIM-SKKU/TVQ ``main_emr_merging.py``):
  elected sign  ε = +1 where mean_t τ_t > 0, else −1 (an exact 0 mean gives −1);
  unified       τ_uni = ε ⊙ max_t |τ_t ⊙ m_t|,   with masks m_t = [τ_t ⊙ ε > 0];
  rescalers     λ_t = Σ_keys mean|τ_t| / Σ_keys mean|m_t ⊙ τ_uni|  (sums of per-tensor means);
  task model    θ_t = θ_pre + λ_t · (m_t ⊙ τ_uni).
Everything but λ_t is per tensor, so the unified pack is written in one streaming pass with
the rescalers appended last; a single task's model needs λ_t first (a pre-pass). A task
whose mask is empty gets λ_t = 0 (the reference would divide by zero).

Unified pack: one safetensors file with ``unified.<key>`` (fp32), ``masks.<key>`` (uint8
``[T, ceil(n/8)]``: each task's mask bit-packed with ``pack_codes(..., 1)``), ``rescalers``
(fp32 ``[T]``), and metadata ``format=tvq-emr``, ``tasks`` (JSON list).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from tvq.errors import CheckpointError, ConfigError, where
from tvq.merge.registry import MergeMethod, merge_method
from tvq.merge.source import TaskSource
from tvq.io.safetensors_writer import StreamingSafetensorsWriter
from tvq.quant.packing import pack_codes, packed_nbytes, unpack_codes
from tvq.vector import TaskVector

FORMAT = "tvq-emr"


def emr_tensor(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(τ_uni, masks [T, *shape] bool, mean|τ_t| [T], mean|m_t ⊙ τ_uni| [T]) for one tensor."""
    rows = len(taus)
    flag = torch.where(taus.mean(dim=0) > 0, 1.0, -1.0)
    masks = torch.empty(taus.shape, dtype=torch.bool)
    magnitude = torch.zeros_like(flag)
    before = torch.empty(rows, dtype=torch.float64)
    after = torch.empty(rows, dtype=torch.float64)
    for t in range(rows):  # one task at a time: temporaries stay at one tensor
        masks[t] = (taus[t] * flag) > 0
        kept = taus[t].abs()
        before[t] = kept.sum(dtype=torch.float64)
        torch.maximum(magnitude, kept.mul_(masks[t]), out=magnitude)
    for t in range(rows):
        after[t] = (magnitude * masks[t]).sum(dtype=torch.float64)
    n = max(flag.numel(), 1)
    return magnitude.mul_(flag), masks, before / n, after / n


def rescalers(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """λ_t = Σ mean|τ_t| / Σ mean|m_t τ_uni|, 0 where the masked unified vector is empty."""
    return torch.where(after > 0, before / after.clamp(min=1e-300), 0.0).float()


@merge_method("emr", aliases=("emr_merging",))
class EMR(MergeMethod):
    """Without ``task``: ``write_pack`` writes the unified pack. With ``task``: that task's model."""

    per_task = True
    scale: float = 0.0

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        if self.task is None:
            return
        before = torch.zeros(len(self.tasks), dtype=torch.float64)
        after = torch.zeros_like(before)
        for key in tqdm(source.keys, desc="emr: rescalers (pre-pass)", unit="tensor", disable=not progress):
            _, _, b, a = emr_tensor(source.stack(key))
            before += b
            after += a
        self.scale = float(rescalers(before, after)[self.tasks.index(self.task)])

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        if self.task is None:
            raise ConfigError("emr writes a unified pack, or one task's model with --task NAME")
        unified, masks, _, _ = emr_tensor(taus)
        return unified.mul_(masks[self.tasks.index(self.task)]).mul_(self.scale)

    def write_pack(self, source: TaskSource, out: Path, progress: bool = False) -> None:
        keys = source.keys
        names = [*(f"unified.{k}" for k in keys), *(f"masks.{k}" for k in keys), "rescalers"]
        meta = {"format": FORMAT, "version": "1", "tasks": json.dumps(self.tasks)}
        writer = StreamingSafetensorsWriter(out, names, meta)
        try:
            before = torch.zeros(len(self.tasks), dtype=torch.float64)
            after = torch.zeros_like(before)
            for key in tqdm(keys, desc="emr: unified pack", unit="tensor", disable=not progress):
                unified, masks, b, a = emr_tensor(source.stack(key))
                before += b
                after += a
                writer.add(f"unified.{key}", unified)
                writer.add(f"masks.{key}", torch.stack([pack_codes(m.reshape(-1).to(torch.uint8), 1) for m in masks]))
                del unified, masks  # before the next tensor's are built
            writer.add("rescalers", rescalers(before, after))
            writer.close()
        except BaseException:
            writer.abort()
            raise


class EMRPack:
    """A unified EMR pack opened lazily: ``task_vector(name)`` is λ_t · (m_t ⊙ τ_uni)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{where(self.path)}: EMR pack not found")
        try:
            self._handle = safe_open(str(self.path), framework="pt")
        except Exception as exc:
            raise CheckpointError(f"{where(self.path)}: not a readable safetensors file ({exc})") from None
        meta = self._handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{where(self.path)}: not a tvq EMR pack (metadata format={meta.get('format')!r})")
        self.tasks: list[str] = json.loads(meta["tasks"])
        self.keys = [n.removeprefix("unified.") for n in self._handle.keys() if n.startswith("unified.")]
        self.rescalers = self._handle.get_tensor("rescalers")

    def mask(self, task: str, key: str) -> torch.Tensor:
        unified = self._handle.get_slice(f"unified.{key}")
        shape = tuple(unified.get_shape())
        n = 1
        for d in shape:
            n *= d
        packed = self._handle.get_tensor(f"masks.{key}")[self._index(task)]
        if packed.numel() != packed_nbytes(n, 1):
            raise CheckpointError(f"{where(self.path, key)}: mask size does not match the unified tensor")
        return unpack_codes(packed, 1, n).reshape(shape).bool()

    def _index(self, task: str) -> int:
        if task not in self.tasks:
            raise ConfigError(f"--task {task!r} is not in the EMR pack {self.path} (tasks: {', '.join(self.tasks)})")
        return self.tasks.index(task)

    def task_tensor(self, task: str, key: str) -> torch.Tensor:
        scale = float(self.rescalers[self._index(task)])
        unified = self._handle.get_tensor(f"unified.{key}")  # mmap-backed and shared: never modify in place
        return (unified * self.mask(task, key)).mul_(scale)

    def task_vector(self, task: str) -> TaskVector:
        self._index(task)
        return TaskVector(self.keys, lambda key: self.task_tensor(task, key), name=task)


def open_emr(path: str | Path) -> EMRPack:
    return EMRPack(path)
