"""Where task vectors come from: FP32 checkpoints, packs, or a mix, checked against θ_pre.

The common currency is a mapping name -> ``TaskVector``. ``TaskSource`` reads them one
tensor at a time (``stack(key)`` -> ``[T, *shape]`` fp32), so a merge never holds more than
one tensor per task, whatever the model size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch

from tvq.config import PaperLoadConfig
from tvq.encode import input_stamp  # the encoder's rule: a rewritten input is never served stale
from tvq.errors import CheckpointError, ConfigError, where
from tvq.io.readers import CheckpointReader, TensorMeta, open_checkpoint
from tvq.quant.coded import CodedTensor
from tvq.vector import TaskVector

Transform = Callable[[str, str, torch.Tensor], torch.Tensor]  # (task, key, tau) -> tau'


class MemoryReader:
    """A state dict in memory behind the reader interface (tests, notebooks)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str = "<state dict>") -> None:
        self.path = Path(path)
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> TensorMeta:
        t = self._tensors[key]
        return TensorMeta(tuple(t.shape), t.dtype)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def as_reader(pretrained: str | Path | CheckpointReader | Mapping[str, torch.Tensor], unsafe_pickle: bool = False) -> CheckpointReader:
    if hasattr(pretrained, "get") and hasattr(pretrained, "meta"):
        return pretrained  # type: ignore[return-value]
    if isinstance(pretrained, Mapping):
        return MemoryReader(pretrained)
    return open_checkpoint(pretrained, unsafe_pickle)


class TaskSource:
    """The task vectors of one merge, checked against the pretrained model's float tensors."""

    def __init__(self, pretrained: CheckpointReader, vectors: Mapping[str, TaskVector], transform: Transform | None = None) -> None:
        if not vectors:
            raise ConfigError("no task vectors to merge (give --pack or --finetuned NAME=PATH)")
        self.pretrained = pretrained
        self.vectors = dict(vectors)
        self.tasks = list(self.vectors)
        self.keys = [k for k in pretrained.keys() if pretrained.meta(k).is_float]
        self._transform = transform
        self._meter = _ByteMeter()
        key_set = set(self.keys)
        for name, tv in self.vectors.items():
            tv_keys = set(tv)
            for key in sorted(key_set - tv_keys)[:1]:
                raise CheckpointError(f"task {name!r}: tensor '{key}' is missing (the pretrained model {pretrained.path} has it)")
            for key in sorted(tv_keys - key_set)[:1]:
                raise CheckpointError(f"task {name!r}: tensor '{key}' is not a float tensor of the pretrained model {pretrained.path}")

    def with_transform(self, transform: Transform) -> TaskSource:
        """The same source with every τ passed through ``transform`` (e.g. DARE); reads count in both."""
        derived = TaskSource(self.pretrained, self.vectors, transform)
        derived._meter = self._meter
        return derived

    @property
    def bytes_read(self) -> int:
        """Input bytes read by ``stack`` so far (pre-passes and, locally, the merge pass)."""
        return self._meter.total

    def nbytes(self, key: str) -> int:
        """Input bytes that reading τ of every task for ``key`` costs (fp32 τ where the origin is unknown)."""
        return sum(tv.nbytes(key) if tv.nbytes is not None else 4 * self.numel(key) for tv in self.vectors.values())

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

    def coded(self, key: str) -> list[CodedTensor] | None:
        """Every task's τ̂ of ``key`` as a value table and codes, or None unless all are coded
        (packs of elementwise schemes) and untransformed. Not metered: see ``count_read``."""
        if self._transform is not None or any(tv.coded is None for tv in self.vectors.values()):
            return None
        out = []
        for tv in self.vectors.values():
            c = tv.coded(key)  # type: ignore[misc]
            if c is None:
                return None
            out.append(c)
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


def meta_nbytes(reader: CheckpointReader, key: str) -> int:
    meta = reader.meta(key)
    return meta.numel * meta.dtype.itemsize


def _pack_nbytes(pack, task: str, pre: CheckpointReader, key: str) -> int:
    """Bytes τ̂ of one tensor reads from a pack: its codes, the RTVQ base's, and θ_pre for FQ."""
    m = pack.manifest
    n = pack.entry(task, key).stored_bytes
    base = m.files[m.base_file].tensors.get(key) if m.base_file else None
    if base is not None:
        n += base.stored_bytes
    if m.method.target == "finetuned":
        n += meta_nbytes(pre, key)
    return n


def load_task_vectors(
    pretrained: str | Path | CheckpointReader,
    *,
    packs: Sequence[str | Path] = (),
    finetuned: Mapping[str, str | Path] | None = None,
    unsafe_pickle: bool = False,
) -> tuple[CheckpointReader, dict[str, TaskVector]]:
    """Open θ_pre and every source; returns the reader and name -> TaskVector (packs first)."""
    from tvq.pack.reader import open_pack

    pre = as_reader(pretrained, unsafe_pickle)
    vectors: dict[str, TaskVector] = {}

    def add(name: str, tv: TaskVector, origin: object) -> None:
        if name in vectors:
            raise ConfigError(f"task name {name!r} appears twice (again in {origin}); rename one with NAME=PATH")
        vectors[name] = tv

    float_keys = {k: pre.meta(k) for k in pre.keys() if pre.meta(k).is_float}
    for pack_path in packs:
        pack = open_pack(pack_path, pre, unsafe_pickle)
        _check_pack_shapes(pack, float_keys, pre)
        for name in pack.tasks:
            tv = pack.task_vector(name)
            tv.origin, tv.nbytes = ("pack", str(pack_path)), partial(_pack_nbytes, pack, name, pre)
            tv.coded = partial(pack.coded, name)
            add(name, tv, pack_path)
    for name, path in (finetuned or {}).items():
        ft = open_checkpoint(path, unsafe_pickle)
        tv = TaskVector.from_checkpoints(pre, ft, name=name)
        tv.origin, tv.nbytes = ("finetuned", str(path)), lambda key, ft=ft: meta_nbytes(ft, key) + meta_nbytes(pre, key)
        add(name, tv, path)
    if not vectors:
        raise ConfigError("no task vectors to merge (give --pack or --finetuned NAME=PATH)")
    return pre, vectors


@dataclass(frozen=True)
class MergeInputs:
    """A merge's inputs as absolute paths: picklable, so remote workers reopen them themselves."""

    pretrained: str
    packs: tuple[str, ...]
    finetuned: tuple[tuple[str, str], ...]  # (task, path)
    tasks: tuple[str, ...]  # the merge's tasks, in its order
    unsafe_pickle: bool = False

    @classmethod
    def of(cls, source: TaskSource, unsafe_pickle: bool = False) -> MergeInputs:
        """The paths behind a source built by ``load_task_vectors``; in-memory inputs cannot travel."""
        unknown = [n for n, tv in source.vectors.items() if tv.origin is None]
        if isinstance(source.pretrained, MemoryReader) or unknown:
            what = f"task {unknown[0]!r}" if unknown else "the pretrained model"
            raise ConfigError(
                f"a remote executor reopens the inputs on its workers, but {what} is in memory: "
                "load task vectors from paths (load_task_vectors, or tvq merge --pack/--finetuned)"
            )
        origins = {n: tv.origin for n, tv in source.vectors.items()}
        packs = tuple(dict.fromkeys(_absolute(p) for kind, p in origins.values() if kind == "pack"))
        fts = tuple((n, _absolute(p)) for n, (kind, p) in origins.items() if kind == "finetuned")
        return cls(_absolute(source.pretrained.path), packs, fts, tuple(source.tasks), unsafe_pickle)

    def open(self) -> TaskSource:
        """The source, opened once per process and version of the input files."""
        files = [self.pretrained, *(f"{p}/manifest.json" for p in self.packs), *(p for _, p in self.finetuned)]
        return _open_inputs(self, tuple(input_stamp(Path(f)) for f in files))


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
    return TaskSource(pre, {t: vectors[t] for t in inputs.tasks})


def _check_pack_shapes(pack, float_keys: dict[str, TensorMeta], pre: CheckpointReader) -> None:
    """Fail before any work when a pack was made from another model (manifest only, no data read)."""
    task = pack.tasks[0]
    for key in sorted(set(float_keys) - set(pack.keys))[:1]:
        raise CheckpointError(f"{where(pack.path, key)}: missing from the pack (the pretrained model {pre.path} has it)")
    for key in sorted(set(pack.keys) - set(float_keys))[:1]:
        raise CheckpointError(f"{where(pack.path, key)}: not a float tensor of the pretrained model {pre.path}")
    for key in pack.keys:
        shape = tuple(pack.entry(task, key).shape)
        if shape != tuple(float_keys[key].shape):
            raise CheckpointError(
                f"{where(pack.path, key)}: shape {list(shape)} differs from the pretrained model's {list(float_keys[key].shape)}"
            )


def check_load_config(cfg: PaperLoadConfig, packs: Sequence[str | Path], n_finetuned: int) -> None:
    """The paper's load_config.json must describe the inputs actually given."""
    from tvq.pack.reader import open_pack

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
