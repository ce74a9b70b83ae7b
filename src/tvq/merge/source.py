"""Where task vectors come from: FP32 checkpoints, packs, or a mix, checked against θ_pre.

A ``TaskVector`` is a pure value; what the engine needs beyond its values is a ``TaskInput``
beside it: where it was read from (so a remote worker can reopen it), the input bytes one
tensor of it costs to read, and its codes when a pack holds it coded. ``load_task_vectors``
builds both and returns them as ``TaskInputs`` (a name -> ``TaskVector`` mapping that keeps
each task's ``TaskInput``); a plain mapping of task vectors is an in-memory input.
``TaskSource`` reads them one tensor at a time (``stack(key)`` -> ``[T, *shape]`` fp32), so a
merge never holds more than one tensor per task, whatever the model size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Literal, Protocol, TypeAlias

import torch

from tvq.config import PaperLoadConfig
from tvq.errors import CheckpointError, ConfigError, where
from tvq.io.base_check import BaseChecker
from tvq.io.readers import (
    CheckpointReader,
    MemoryReader,
    SafetensorsReader,
    TensorMeta,
    as_reader,
    element_reader,
    float_keys,
    open_checkpoint,
)
from tvq.io.stamps import input_stamp
from tvq.io.tied import tied_names
from tvq.normstats import statistic_keys
from tvq.pack.reader import Pack, open_pack
from tvq.quant.coded import CodedTensor
from tvq.vector import TaskVector

Transform = Callable[[str, str, torch.Tensor], torch.Tensor]  # (task, key, tau) -> tau'


class BlockReader(Protocol):
    """τ of one tensor of one task a block of flat elements at a time, blocks read in order
    (``Pack.task_blocks``, ``CheckpointBlocks``): a value table and codes, or fp32 values."""

    def read(self, start: int, end: int) -> CodedTensor | torch.Tensor: ...


NO_TASKS = "no task vectors to merge (give --pack or --finetuned NAME=PATH)"


@dataclass(frozen=True)
class Origin:
    """The file a task vector is read from: a pack (which holds the task) or a fine-tuned checkpoint."""

    kind: Literal["pack", "finetuned"]
    path: str


@dataclass(frozen=True)
class TaskInput:
    """One task of a merge: its τ, and what the engine knows about reading it."""

    name: str
    vector: TaskVector
    origin: Origin | None = None  # None: in memory, so a remote worker cannot reopen it
    read_bytes: Callable[[str], int] | None = None  # key -> input bytes τ of that key reads; None: fp32 τ
    codes: Callable[[str], CodedTensor | None] | None = None  # key -> τ̂ as table + codes (packs)
    buffers: Callable[[str], torch.Tensor | None] | None = None  # key -> the task's own non-float tensor (checkpoints)
    blocks: Callable[[str], BlockReader | None] | None = None  # key -> τ by element blocks, or None (read it whole)
    same: Callable[[str, str], bool] | None = None  # (key, other) -> τ is the same, known without reading; None: compare

    def same_tau(self, key: str, other: str) -> bool:
        """Whether τ of ``key`` equals τ of ``other`` (tied weights): a tensor the task does not
        hold is its tied name's; without ``same`` both are read and compared."""
        if key not in self.vector or other not in self.vector:
            return True
        if self.same is not None:
            return self.same(key, other)
        return torch.equal(self.vector[key], self.vector[other])

    def nbytes(self, key: str, numel: int) -> int:
        """Input bytes that reading τ of ``key`` (``numel`` elements) costs."""
        return self.read_bytes(key) if self.read_bytes is not None else 4 * numel

    def coded(self, key: str) -> CodedTensor | None:
        """τ̂ of ``key`` as a value table and codes, or None (not from a pack, or not coded)."""
        return self.codes(key) if self.codes is not None else None


class TaskInputs(Mapping[str, TaskVector]):
    """name -> ``TaskVector`` in merge order, with each task's ``TaskInput`` kept beside it."""

    def __init__(self, inputs: Iterable[TaskInput]) -> None:
        self._inputs: dict[str, TaskInput] = {}
        for task in inputs:
            if task.name in self._inputs:
                raise ConfigError(f"task name {task.name!r} appears twice; rename one with NAME=PATH")
            self._inputs[task.name] = task

    @classmethod
    def of(cls, vectors: Mapping[str, TaskVector]) -> TaskInputs:
        """``vectors`` themselves when they are ``TaskInputs``; otherwise in-memory inputs."""
        if isinstance(vectors, TaskInputs):
            return vectors
        return cls(TaskInput(name, tv) for name, tv in vectors.items())

    def __getitem__(self, name: str) -> TaskVector:
        return self._inputs[name].vector

    def __iter__(self) -> Iterator[str]:
        return iter(self._inputs)

    def __len__(self) -> int:
        return len(self._inputs)

    def input(self, name: str) -> TaskInput:
        return self._inputs[name]

    def inputs(self) -> list[TaskInput]:
        return list(self._inputs.values())

    def select(self, names: Iterable[str]) -> TaskInputs:
        """These tasks only, in the given order (their inputs kept)."""
        return TaskInputs(self._inputs[n] for n in names)


Statistics: TypeAlias = "torch.nn.Module | Iterable[str] | None"  # see TaskSource


def resolve_statistics(pretrained: CheckpointReader, statistics: Statistics = None) -> list[str]:
    """The running statistics among the pretrained model's tensors, in its order: by name
    (None), by name and by the module's structure (a module), or exactly the keys given."""
    names = pretrained.keys()
    if statistics is None or isinstance(statistics, torch.nn.Module):
        return statistic_keys(names, statistics)
    given = list(dict.fromkeys(statistics))
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"statistics: '{unknown[0]}' is not a tensor of the pretrained model {pretrained.path}")
    chosen = set(given)
    return [k for k in names if k in chosen]


class TaskSource:
    """The task vectors of one merge, checked against the pretrained model's float tensors.

    ``keys`` are the tensors a merge method merges: every float tensor but the running
    statistics (``statistics``: detected by name when None; a module adds its normalization
    layers' buffers; an explicit list of keys is used as it is, ``[]`` merging every float
    tensor as tvq did before issue 14), nor the second names of tied weights (``tied``:
    alias -> first name, merged once; ``tvq.io.tied``). The statistics are chosen, not merged
    (``tvq.merge.statistics``); task vectors still hold them."""

    def __init__(
        self,
        pretrained: CheckpointReader,
        vectors: Mapping[str, TaskVector],
        transform: Transform | None = None,
        statistics: Statistics = None,
    ) -> None:
        if not vectors:
            raise ConfigError(NO_TASKS)
        self.pretrained = pretrained
        self.vectors = TaskInputs.of(vectors)
        self.inputs = self.vectors.inputs()
        self.tasks = list(self.vectors)
        every_float = float_keys(pretrained)
        self.statistics = resolve_statistics(pretrained, statistics)
        stats = set(self.statistics)
        merged = [k for k in every_float if k not in stats]
        candidates = {a: k for a, k in tied_names(pretrained).items() if a not in stats and k not in stats}
        self._transform = transform
        self._meter = _ByteMeter()
        key_set = set(every_float)
        for name, tv in self.vectors.items():
            tv_keys = set(tv)
            for key in sorted(key_set - tv_keys - candidates.keys())[:1]:
                raise CheckpointError(f"task {name!r}: tensor '{key}' is missing (the pretrained model {pretrained.path} has it)")
            for key in sorted(tv_keys - key_set)[:1]:
                raise CheckpointError(f"task {name!r}: tensor '{key}' is not a float tensor of the pretrained model {pretrained.path}")
        # tied weights whose τ is one tensor in every task merge once (tvq.io.tied); the others stay names of their own
        self.tied = {a: k for a, k in candidates.items() if all(task.same_tau(a, k) for task in self.inputs)}
        for task in self.inputs:
            for key in [a for a in candidates.keys() - self.tied.keys() if a not in task.vector][:1]:
                raise CheckpointError(f"task {task.name!r}: tensor '{key}' is missing (the pretrained model {pretrained.path} has it)")
        self.keys = [k for k in merged if k not in self.tied]
        self.float_statistics = [k for k in every_float if k in stats]

    def with_transform(self, transform: Transform) -> TaskSource:
        """The same source with every τ passed through ``transform`` (e.g. DARE); reads count in both."""
        derived = TaskSource(self.pretrained, self.vectors, transform, self.statistics)
        derived._meter = self._meter
        return derived

    @property
    def bytes_read(self) -> int:
        """Input bytes read by ``stack`` so far (pre-passes and, locally, the merge pass)."""
        return self._meter.total

    def nbytes(self, key: str) -> int:
        """Input bytes that reading τ of every task for ``key`` costs (fp32 τ where the origin is unknown)."""
        numel = self.numel(key)
        return sum(task.nbytes(key, numel) for task in self.inputs)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.pretrained.meta(key).shape)

    def numel(self, key: str) -> int:
        return self.pretrained.meta(key).numel

    def tensor(self, task: str, key: str) -> torch.Tensor:
        """τ of one task for one tensor, fp32, shape-checked."""
        tau = self.vectors[task][key]
        if tuple(tau.shape) != self.shape(key):
            where_ = where(self.pretrained.path, key)
            raise CheckpointError(
                f"task {task!r}: {where_}: shape {list(tau.shape)} differs from the pretrained model's {list(self.shape(key))}"
            )
        tau = tau.float()
        if self._transform is None:
            return tau
        return self._transform(task, key, tau.clone())  # transforms may work in place; never on the caller's data

    def has_codes(self) -> bool:
        """Whether every task comes from a pack (untransformed): ``coded`` may then answer (per
        tensor: not for the tensors a pack stores exactly, nor for non-elementwise schemes)."""
        return self._transform is None and all(task.codes is not None for task in self.inputs)

    def coded(self, key: str) -> list[CodedTensor] | None:
        """Every task's τ̂ of ``key`` as a value table and codes, or None unless all are coded
        (packs of elementwise schemes) and untransformed. Not metered: see ``count_read``."""
        if self._transform is not None or any(task.codes is None for task in self.inputs):
            return None
        out = []
        for task in self.inputs:
            c = task.coded(key)
            if c is None:
                return None
            out.append(c)
        return out

    def blocks(self, key: str) -> list[BlockReader] | None:
        """Every task's τ of ``key`` by element blocks (fresh readers, read in order), or None
        unless all tasks can (packs of elementwise schemes, safetensors checkpoints) and untransformed.
        Not metered: see ``count_read``."""
        if self._transform is not None or any(task.blocks is None for task in self.inputs):
            return None
        out = []
        for task in self.inputs:
            assert task.blocks is not None
            reader = task.blocks(key)
            if reader is None:
                return None
            out.append(reader)
        return out

    def count_read(self, key: str) -> None:
        """Count ``key``'s input bytes as read (``stack`` does this itself; ``coded`` leaves it
        to the caller, who may still fall back to ``stack``)."""
        self._meter.add(self.nbytes(key))

    def stack(self, key: str) -> torch.Tensor:
        """``[T, *shape]`` fp32, filled one task at a time (no second copy)."""
        out = torch.empty((len(self.tasks), *self.shape(key)), dtype=torch.float32)
        for i, task in enumerate(self.tasks):
            out[i] = self.tensor(task, key)
        self._meter.add(self.nbytes(key))
        return out


class _ByteMeter:
    """A byte count that threads can add to."""

    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n


def _pack_nbytes(pack: Pack, task: str, pre: CheckpointReader, key: str) -> int:
    """Bytes τ̂ of one tensor reads from a pack: its codes, the RTVQ base's, and θ_pre for FQ."""
    m = pack.manifest
    n = pack.entry(task, key).stored_bytes
    base = m.files[m.base_file].tensors.get(key) if m.base_file else None
    if base is not None:
        n += base.stored_bytes
    if m.method.target == "finetuned":
        n += pre.meta(key).nbytes
    return n


def _checkpoint_nbytes(ft: CheckpointReader, pre: CheckpointReader, key: str) -> int:
    """Bytes τ of one tensor reads from two checkpoints: the fine-tuned tensor and θ_pre's."""
    return ft.meta(key).nbytes + pre.meta(key).nbytes


def pack_inputs(pack: Pack, pre: CheckpointReader) -> list[TaskInput]:
    """Every task of an opened pack, reopenable from its path, with its codes."""
    origin = Origin("pack", str(pack.path))
    return [
        TaskInput(name, pack.task_vector(name), origin, partial(_pack_nbytes, pack, name, pre), partial(pack.coded, name),
                  blocks=partial(pack.task_blocks, name), same=partial(pack.same_tensor, name))  # fmt: skip
        for name in pack.tasks
    ]


def _own_tensor(reader: CheckpointReader, key: str) -> torch.Tensor | None:
    return reader.get(key) if key in set(reader.keys()) else None


@dataclass(frozen=True)
class CheckpointBlocks:
    """τ = θ_ft − θ_pre of one tensor by element blocks, as ``TaskVector.from_checkpoints``
    forms it (both in fp32, then the difference): only the block's bytes are read."""

    finetuned: SafetensorsReader | MemoryReader
    pretrained: SafetensorsReader | MemoryReader
    key: str

    def read(self, start: int, end: int) -> torch.Tensor:
        return self.finetuned.get_elements(self.key, start, end).float() - self.pretrained.get_elements(self.key, start, end).float()


def _checkpoint_blocks(ft: CheckpointReader, pre: CheckpointReader, key: str) -> CheckpointBlocks | None:
    ft_elements, pre_elements = element_reader(ft), element_reader(pre)
    if ft_elements is None or pre_elements is None:
        return None
    return CheckpointBlocks(ft_elements, pre_elements, key)


def checkpoint_input(name: str, pre: CheckpointReader, path: str | Path, unsafe_pickle: bool = False) -> TaskInput:
    """τ = θ_ft − θ_pre of a fine-tuned checkpoint, reopenable from its path."""
    ft = open_checkpoint(path, unsafe_pickle)
    tv = TaskVector.from_checkpoints(pre, ft, name=name)
    tied = tied_names(ft)

    def same(key: str, other: str) -> bool:  # tied in the fine-tuned file too: one tensor, nothing to read
        return tied.get(key) == other or torch.equal(tv[key], tv[other])

    return TaskInput(name, tv, Origin("finetuned", str(path)), partial(_checkpoint_nbytes, ft, pre), buffers=partial(_own_tensor, ft),
                     blocks=partial(_checkpoint_blocks, ft, pre), same=same)  # fmt: skip


def load_task_vectors(
    pretrained: str | Path | CheckpointReader,
    *,
    packs: Sequence[str | Path] = (),
    finetuned: Mapping[str, str | Path] | None = None,
    unsafe_pickle: bool = False,
) -> tuple[CheckpointReader, TaskInputs]:
    """Open θ_pre and every source; returns the reader and name -> TaskVector (packs first),
    as ``TaskInputs``: ``merge`` reads packs from their codes and remote workers reopen them."""
    pre = as_reader(pretrained, unsafe_pickle)
    inputs: dict[str, TaskInput] = {}

    def add(task: TaskInput, where_from: str | Path) -> None:
        if task.name in inputs:
            raise ConfigError(f"task name {task.name!r} appears twice (again in {where_from}); rename one with NAME=PATH")
        inputs[task.name] = task

    float_metas = {k: pre.meta(k) for k in float_keys(pre)}
    for pack_path in packs:
        pack = open_pack(pack_path, pre, unsafe_pickle)
        _check_pack_shapes(pack, float_metas, pre)
        for task in pack_inputs(pack, pre):
            add(task, pack_path)
    for name, path in (finetuned or {}).items():
        add(checkpoint_input(name, pre, path, unsafe_pickle), path)
    if not inputs:
        raise ConfigError(NO_TASKS)
    return pre, TaskInputs(inputs.values())


@dataclass(frozen=True)
class MergeInputs:
    """A merge's inputs as absolute paths: picklable, so remote workers reopen them themselves."""

    pretrained: str
    packs: tuple[str, ...]
    finetuned: tuple[tuple[str, str], ...]  # (task, path)
    tasks: tuple[str, ...]  # the merge's tasks, in its order
    unsafe_pickle: bool = False
    statistics: tuple[str, ...] | None = None  # the source's running statistics (None: by name)

    @classmethod
    def of(cls, source: TaskSource, unsafe_pickle: bool = False) -> MergeInputs:
        """The paths behind a source built by ``load_task_vectors``; in-memory inputs cannot travel."""
        origins: dict[str, Origin] = {}
        for task in source.inputs:
            if task.origin is None:
                raise ConfigError(_NOT_REMOTE.format(what=f"task {task.name!r}"))
            origins[task.name] = task.origin
        if not Path(source.pretrained.path).exists():  # a state dict, or a reader of no file of its own
            raise ConfigError(_NOT_REMOTE.format(what="the pretrained model"))
        packs = tuple(dict.fromkeys(_absolute(o.path) for o in origins.values() if o.kind == "pack"))
        fts = tuple((n, _absolute(o.path)) for n, o in origins.items() if o.kind == "finetuned")
        return cls(_absolute(source.pretrained.path), packs, fts, tuple(source.tasks), unsafe_pickle, tuple(source.statistics))

    def open(self) -> TaskSource:
        """The source, opened once per process and version of the input files."""
        files = [self.pretrained, *(f"{p}/manifest.json" for p in self.packs), *(p for _, p in self.finetuned)]
        return _open_inputs(self, tuple(input_stamp(Path(f)) for f in files))


_NOT_REMOTE = (
    "a remote executor reopens the inputs on its workers, but {what} is in memory: "
    "load task vectors from paths (load_task_vectors, or tvq merge --pack/--finetuned)"
)


def _absolute(path: str | Path) -> str:
    return str(Path(path).resolve())


@lru_cache(maxsize=4)
def _open_inputs(inputs: MergeInputs, stamps: tuple[tuple[int, int], ...]) -> TaskSource:
    pre, vectors = load_task_vectors(
        inputs.pretrained, packs=inputs.packs, finetuned=dict(inputs.finetuned), unsafe_pickle=inputs.unsafe_pickle
    )
    missing = [t for t in inputs.tasks if t not in vectors]
    if missing:
        raise CheckpointError(f"task {missing[0]!r} is not in the inputs as this worker sees them (packs changed?)")
    return TaskSource(pre, vectors.select(inputs.tasks), statistics=inputs.statistics)


def check_pack_bases(pretrained: CheckpointReader, packs: Sequence[str | Path]) -> None:
    """Refuse a pretrained model other than the one each pack was made from, by content hash
    (``tvq.io.base_check``): keys and shapes match for any revision of a model. One hashing
    pass per digest algorithm, whatever the number of packs; run it before writing outputs."""
    checker = BaseChecker(pretrained)
    for path in packs:
        checker.check(open_pack(path).manifest.pretrained.digest, path)


def _check_pack_shapes(pack: Pack, float_metas: dict[str, TensorMeta], pre: CheckpointReader) -> None:
    """Fail before any work when a pack was made from another model (manifest only, no data read)."""
    task = pack.tasks[0]
    for key in sorted(set(float_metas) - set(pack.keys))[:1]:
        raise CheckpointError(f"{where(pack.path, key)}: missing from the pack (the pretrained model {pre.path} has it)")
    for key in sorted(set(pack.keys) - set(float_metas))[:1]:
        raise CheckpointError(f"{where(pack.path, key)}: not a float tensor of the pretrained model {pre.path}")
    for key in pack.keys:
        shape = tuple(pack.entry(task, key).shape)
        if shape != tuple(float_metas[key].shape):
            raise CheckpointError(
                f"{where(pack.path, key)}: shape {list(shape)} differs from the pretrained model's {list(float_metas[key].shape)}"
            )


def check_load_config(cfg: PaperLoadConfig, packs: Sequence[str | Path], n_finetuned: int) -> None:
    """The paper's load_config.json must describe the inputs actually given."""
    if cfg.load_tv_type == "baseline":
        if packs:
            raise ConfigError("load_config: load_tv_type 'baseline' means FP32 task vectors; drop --pack or change load_tv_type")
        if not n_finetuned:
            raise ConfigError("load_config: load_tv_type 'baseline' needs --finetuned NAME=PATH checkpoints")
        return
    if not packs:
        raise ConfigError(f"load_config: load_tv_type {cfg.load_tv_type!r} needs a pack (--pack)")
    want_target = "finetuned" if cfg.load_tv_type == "quantized_finetuned" else "task_vector"
    want_residual = cfg.load_tv_type == "quantized_residual_task_vector"
    for path in packs:
        m = open_pack(path).manifest.method
        got = f"{m.label} (target={m.target}, residual={m.residual}, bits={m.bits}, base_bits={m.base_bits})"
        if m.target != want_target or m.residual != want_residual:
            raise ConfigError(f"load_config: load_tv_type {cfg.load_tv_type!r} does not match the pack {path}: {got}")
        if cfg.load_task_bits is not None and cfg.load_task_bits != m.bits:
            raise ConfigError(f"load_config: load_task_bits={cfg.load_task_bits} but the pack {path} has {got}")
        if want_residual and cfg.load_base_bits is not None and cfg.load_base_bits != m.base_bits:
            raise ConfigError(f"load_config: load_base_bits={cfg.load_base_bits} but the pack {path} has {got}")
