"""Running a merge: stream tensors through a method and write a model (file or HF folder).

Per tensor: stack the T task vectors (fp32), let the method merge them, add θ_pre in place,
cast to the output dtype, append to the output. Peak memory ≈ (T + 2) × the largest tensor
plus the method's temporaries and the output buffer, whatever the model size. Methods that
merge by blocks (elementwise ones: task arithmetic, average, MagMax, LiNeS, Consensus, DARE
without per-tensor statistics, EMR's task model; TIES, whose per-tensor cut-offs and majority
sign come from pre-passes over the blocks) stream every tensor larger than a block a block of
elements at a time into a safetensors output (tvq.merge.blocks): their working set is about
(T + 3) blocks, whatever the largest tensor, with the same bytes out. EMR's unified pack
streams the same way (``EMR.write_pack``), and a task's model from it reads only each
block's elements and mask bytes (``emr_task_model``).

That per-tensor work is a ``MergeJob`` run by any ``tvq.execute`` executor (local threads,
Ray); the driver writes the results in key order, so the output is byte-identical whichever
executor ran it. Global statistics (``prepare``) are computed once on the driver and travel
inside the pickled method; remote jobs carry input paths, never open files.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from tqdm import tqdm

from tvq.device import on_host, parse_device
from tvq.errors import ConfigError, PackError, where
from tvq.execute import Executor, LocalExecutor
from tvq.io.atomic import Kind, atomic_dir, atomic_file, check_output
from tvq.io.dtypes import output_dtype
from tvq.io.hub import hub_id_of, resolve_model
from tvq.io.model_files import is_weight_file
from tvq.io.readers import CheckpointReader, as_reader
from tvq.io.safetensors_writer import StreamingSafetensorsWriter
from tvq.io.torch_pickle_writer import pickle_template, write_like
from tvq.merge.blocks import BlockMerge, Chunked, may_code, merged_value
from tvq.merge.card import card_files, task_records, write_files
from tvq.merge.methods.emr import open_emr
from tvq.merge.plan import MergePlan
from tvq.merge.recipe import MERGEKIT_FILE, RECIPE_FILE
from tvq.merge.registry import KeptDensity, MergeMethod, MethodOptions, build_method
from tvq.merge.source import MergeInputs, Statistics, TaskInput, TaskInputs, TaskSource
from tvq.merge.statistics import NormStats, NormStatsChoice, NormStatsWarning, resolve_choice
from tvq.pack.reader import Pack
from tvq.vector import TaskVector

SINGLE_FILE = "model.safetensors"
SHARD_PATTERN = "model{suffix}.safetensors"  # huggingface_hub's: model-00001-of-00003.safetensors
OutKind = Literal["auto", "folder", "file"]
INDEX_FILE = "model.safetensors.index.json"
Deltas = Callable[[str], torch.Tensor]  # key -> fp32 merged task vector (owned by the caller)


@dataclass
class MergeReport:
    """What was written: the output path, its files and size, and which method made it."""

    out: Path
    method: str
    tasks: list[str]
    files: list[Path] = field(default_factory=list)
    bytes_written: int = 0
    bytes_read: int = 0  # input tensor bytes: pre-passes, θ_pre and every τ (packed codes for packs)
    norm_stats: str | None = None  # where the running statistics came from (None: the model has none)
    kept: KeptDensity | None = None  # top-k methods (TIES, Breadcrumbs, ...): the density the trim actually kept


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``same``/None keeps each tensor's pretrained dtype; otherwise float32/float16/bfloat16."""
    try:
        return output_dtype(dtype)
    except ValueError as exc:
        raise ConfigError(f"--dtype {exc}") from None


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise ConfigError(f"--max-shard-size {size!r}: expected e.g. 5GB, 500MB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    value = float(m.group(1)) * base ** "_KMGT".index(m.group(2) or "_")
    if value < 1:
        raise ConfigError(f"--max-shard-size {size!r} must be positive")
    return int(value)


def hf_folder(pretrained: str | Path | CheckpointReader | Mapping) -> Path | None:
    """The Hugging Face folder (one with config.json) the pretrained model was read from, if any."""
    if isinstance(pretrained, Mapping) and not hasattr(pretrained, "meta"):
        return None
    p = resolve_model(pretrained) if isinstance(pretrained, (str, Path)) else Path(getattr(pretrained, "path", ""))
    if p.is_file() and p.name in ("model.safetensors", "pytorch_model.bin"):
        p = p.parent
    return p if p.is_dir() and (p / "config.json").is_file() else None


@dataclass
class LocalWork:
    """Live readers and the merge function: in-process jobs (threads share them)."""

    pretrained: CheckpointReader
    deltas: Deltas
    blocks: BlockMerge | None = None  # large tensors merged by blocks on the driver (safetensors outputs)

    def open(self) -> tuple[CheckpointReader, Deltas]:
        return self.pretrained, self.deltas


@dataclass(frozen=True)
class RemoteWork:
    """What a remote job carries: input paths, and the prepared method pickled once by the driver.
    ``blocks`` stays on the driver (never shipped): tensors larger than a block stream there, by
    blocks, as with local threads, instead of being merged whole on a worker."""

    inputs: MergeInputs
    method: bytes
    blocks: BlockMerge | None = field(default=None, compare=False)

    def __getstate__(self) -> dict[str, object]:
        return {"inputs": self.inputs, "method": self.method, "blocks": None}

    def open(self) -> tuple[CheckpointReader, Deltas]:
        source = self.inputs.open()
        return source.pretrained, method_deltas(_unpickled_method(self.method), source)


@lru_cache(maxsize=4)
def _unpickled_method(blob: bytes) -> MergeMethod:
    return pickle.loads(blob)  # bytes our own driver pickled


@dataclass
class MergeJob:
    """One float tensor of the output."""

    key: str
    work: LocalWork | RemoteWork
    dtype: torch.dtype | None
    memory: int = 0  # bytes it may hold: (T + 3) fp32 copies of the tensor (stack, method scratch, output)

    def memory_estimate(self) -> int:
        """For the executor's memory-aware admission: big tensors are not merged side by side."""
        return self.memory


def merge_key(job: MergeJob) -> torch.Tensor:
    """θ_pre + δ for one tensor: fp32 arithmetic, then the cast (the same bytes on any executor)."""
    pretrained, deltas = job.work.open()
    return merged_value(job.key, deltas(job.key), pretrained.get(job.key), job.dtype)


def iter_model(
    pretrained: CheckpointReader,
    work: LocalWork | RemoteWork,
    float_keys: set[str],
    dtype: torch.dtype | None,
    desc: str,
    progress: bool,
    executor: Executor | None = None,
    tasks: int = 1,
    statistics: NormStats | None = None,
    tied: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, torch.Tensor | Chunked]]:
    """Merged float tensors (from the executor, in key order; those ``work.blocks`` streams, by
    blocks on the driver), running statistics as chosen (``statistics``, on the driver: they
    are tiny), other tensors copied as they are. ``tied`` (alias -> first name, ``TaskSource.tied``):
    an alias gets its first name's merged tensor (held until then; streamed again if it streams)."""
    keys = pretrained.keys()
    chosen = set(statistics.keys) if statistics is not None else set()
    merged_keys = float_keys - chosen
    blocks = work.blocks
    streamed = blocks.plan(merged_keys) if blocks is not None else set()
    jobs = (MergeJob(k, work, dtype, (tasks + 3) * 4 * pretrained.meta(k).numel) for k in keys if k in merged_keys - streamed)
    merged = (executor or LocalExecutor()).map(merge_key, jobs)
    aliases = {a: k for a, k in (tied or {}).items() if k in merged_keys}
    waiting = Counter(k for k in aliases.values() if k not in streamed)  # aliases still to write, per held tensor
    held: dict[str, torch.Tensor] = {}
    for key in tqdm(keys, desc=desc, unit="tensor", disable=not progress):
        first = aliases.get(key)
        if first is not None and first in streamed:
            assert blocks is not None
            yield key, blocks.stream(first, dtype)
        elif first is not None:
            waiting[first] -= 1
            yield key, held[first] if waiting[first] else held.pop(first)
        elif key in chosen:
            assert statistics is not None
            yield key, statistics.value(key, dtype)
        elif key in streamed:
            assert blocks is not None
            yield key, blocks.stream(key, dtype)
        else:
            value = next(merged) if key in merged_keys else pretrained.get(key)
            if waiting[key]:
                held[key] = value
            yield key, value


def method_deltas(method: MergeMethod, source: TaskSource) -> Deltas:
    """key -> merged task vector: from codes when the method and the inputs allow it (the
    same bytes, see tvq.merge.coded), else from the dense fp32 stack."""

    def deltas(key: str) -> torch.Tensor:
        coded = source.coded(key) if may_code(method) else None
        merged = method.merge_coded(key, coded) if coded is not None else None
        if merged is not None:
            source.count_read(key)
            return merged.reshape(source.shape(key))
        return method.merge_tensor(key, source.stack(key))

    return deltas


def method_work(method: MergeMethod, source: TaskSource, executor: Executor | None, unsafe_pickle: bool = False,
                device: torch.device | None = None) -> LocalWork | RemoteWork:  # fmt: skip
    """Jobs for ``executor``: live objects in process, paths and the pickled method when remote.
    ``device``: where the tensors merged by blocks are merged (the others are small: the host)."""
    if getattr(executor, "remote", False):
        return RemoteWork(MergeInputs.of(source, unsafe_pickle), pickle.dumps(method), BlockMerge(method, source, device=device))
    return LocalWork(source.pretrained, method_deltas(method, source), BlockMerge(method, source, device=device))


def pass_bytes(source: TaskSource) -> int:
    """Input bytes of the writing pass: all of θ_pre and τ of every task for every float key."""
    pre = source.pretrained
    names = pre.keys()
    return sum(pre.meta(k).nbytes for k in names) + sum(source.nbytes(k) for k in source.keys)


def output_statistics(
    source: TaskSource,
    norm_stats: str | None,
    task: str | None = None,
    vectors: Mapping[str, TaskVector] | None = None,
    warn: bool = True,
) -> NormStats | None:
    """How the output model gets its running statistics (None when it has none): ``norm_stats``
    (``pretrained``, ``mean``, ``task:NAME``) or the default, over ``vectors`` (default: the
    source's tasks). Warns (``NormStatsWarning``, one line) when the default was taken and the
    tasks changed the statistics."""
    tasks = list(vectors) if vectors is not None else source.tasks
    if not source.statistics:
        if norm_stats is not None:
            NormStatsChoice.parse(norm_stats, tasks)  # a typo is still an error
        return None
    choice, settled = resolve_choice(norm_stats, tasks, task)
    buffers = {t.name: t.buffers for t in source.inputs} if vectors is None else {}
    stats = NormStats(source.pretrained, vectors if vectors is not None else source.vectors, source.statistics, choice, buffers)
    message = stats.warning(stats.changed(), settled) if warn else None
    if message is not None:
        warnings.warn(message, NormStatsWarning, stacklevel=3)
    return stats


def merge_state_dict(
    method: str,
    pretrained: str | Path | CheckpointReader | Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, TaskVector],
    options: Mapping[str, Any] | MethodOptions | None = None,
    *,
    task: str | None = None,
    dtype: str | torch.dtype | None = "same",
    norm_stats: str | None = None,
    statistics: Statistics = None,
) -> dict[str, torch.Tensor]:
    """The merged model in memory (small models, tests): the same stream, collected in a dict.
    ``norm_stats`` and ``statistics`` as for :func:`merge`."""
    pre = as_reader(pretrained)
    source = TaskSource(pre, task_vectors, statistics=statistics)
    m = build_method(method, options, source.tasks, task)
    if m.per_task and task is None:
        raise ConfigError(f"{m.name} merges into one model per task: pass task=NAME")
    stats = output_statistics(source, norm_stats, task)
    m.prepare(source)
    merged = iter_model(pre, LocalWork(pre, method_deltas(m, source)), set(source.keys), parse_dtype(dtype), m.name, False,
                        tasks=len(source.tasks), statistics=stats, tied=source.tied)  # fmt: skip
    return dict(_whole(merged))


def merge(
    method: str,
    pretrained: str | Path | CheckpointReader | Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, TaskVector],
    out: str | Path,
    options: Mapping[str, Any] | MethodOptions | None = None,
    *,
    task: str | None = None,
    dtype: str | torch.dtype | None = "same",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
    inputs: Sequence[str | Path] = (),
    executor: Executor | None = None,
    unsafe_pickle: bool = False,
    norm_stats: str | None = None,
    statistics: Statistics = None,
    out_kind: OutKind = "auto",
    card: bool = True,
    extra_files: Mapping[str, str] | None = None,
    device: str | torch.device | None = None,
) -> MergeReport:
    """Merge ``task_vectors`` into ``pretrained`` with ``method`` and write the result to ``out``.

    ``out_kind="auto"``: a Hugging Face pretrained folder gives a Hugging Face folder (sharded
    above ``max_shard_size``, config and tokenizer files copied) unless ``out`` ends in
    ``.safetensors``; otherwise one safetensors file. ``"folder"`` / ``"file"`` say it outright
    (a folder from a pretrained file has the weights, card and recipe, no config). A folder
    carries a model card (``README.md``) and ``tvq_recipe.yml`` that reproduces it (``card``),
    plus ``extra_files`` (name -> text, e.g. the mergekit config it came from). Per-task methods (EMR) write their
    unified pack, or with ``task=NAME`` that task's model. ``inputs`` are paths that must not
    be overwritten (the pretrained path is always protected). ``executor`` runs the per-tensor
    merges (same bytes out); a remote one needs inputs opened by ``load_task_vectors`` from
    paths (its ``TaskInputs``, or a ``select`` of them: a plain mapping of task vectors is in
    memory), reopened on the workers (with ``unsafe_pickle``). Packs from ``load_task_vectors``
    merge from their codes where the method allows. EMR's unified pack is written locally.

    Running statistics (BatchNorm's running mean/var, ...) are never merged: ``norm_stats``
    picks them (``mean`` of the tasks', ``pretrained``, ``task:NAME``; default ``mean``
    for one merged model, the task's own with ``task``; see ``tvq.merge.statistics``).
    ``statistics`` says which tensors they are: None detects them by name, a module adds its
    normalization layers' buffers, a list of keys is taken as it is (``[]``: none, every float
    tensor merged as before). ``device`` (cpu, cuda, cuda:N): where tensors larger than a block
    are merged, block by block (tvq.device; the same bytes for the methods that support it:
    ``MergeMethod.on_device``).
    """
    compute = parse_device(device)
    pre = as_reader(pretrained)
    source = TaskSource(pre, task_vectors, statistics=statistics)
    m = build_method(method, options, source.tasks, task)
    out = Path(out)
    protected = [Path(p) for p in inputs] + ([Path(pretrained)] if isinstance(pretrained, (str, Path)) else [])
    folder = hf_folder(pretrained)
    if folder is not None:
        protected.append(folder)
    writes_pack = m.per_task and task is None
    if writes_pack and out_kind == "folder":
        raise ConfigError(f"{m.name} without --task writes its unified pack, one file: --out-kind folder does not apply")
    check_output(out, overwrite, protected, kind="file" if writes_pack else output_kind(out, folder, out_kind))
    dtype_ = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if writes_pack:
        if norm_stats is not None:
            raise ConfigError(
                "--norm-stats chooses the statistics of a model; the unified pack keeps every task's own "
                "(choose them when writing a task's model with --task)"
            )
        with atomic_file(out, overwrite=overwrite) as tmp:
            m.write_pack(source, tmp, progress)
        return MergeReport(out, m.name, source.tasks, [out], out.stat().st_size, source.bytes_read)
    stats = output_statistics(source, norm_stats, task)
    if m.runs_on_device() and not on_host(compute):
        m.prepass_device = compute
    m.prepare(source, progress)
    prepared = source.bytes_read
    label = f"{m.name}" + (f" [{task}]" if task else "")
    files = dict(extra_files or {})
    if card and output_kind(out, folder, out_kind) == "dir":
        plan = merge_plan(m, pretrained, task_vectors, dtype, norm_stats)
        files = {**card_files(plan, task_records(_origins(task_vectors)), loadable=folder is not None,
                              mergekit_text=files.pop(MERGEKIT_FILE, None)), **files}  # fmt: skip
    work = method_work(m, source, executor, unsafe_pickle, compute if m.runs_on_device() else None)
    report = write_model(pre, work, set(source.keys), out, label, source.tasks,
                         dtype=dtype_, hf_from=folder, max_shard_size=shard_bytes, progress=progress,
                         executor=executor, overwrite=overwrite, statistics=stats, out_kind=out_kind, files=files,
                         tied=source.tied)  # fmt: skip
    prepasses = work.blocks.prepass_bytes if work.blocks is not None else 0
    report.bytes_read = prepared + pass_bytes(source) + prepasses + (stats.bytes_read if stats is not None else 0)
    report.kept = m.kept_density(source)
    return report


def _origins(vectors: Mapping[str, TaskVector]) -> dict[str, tuple[str, str] | None]:
    inputs = TaskInputs.of(vectors)
    out: dict[str, tuple[str, str] | None] = {}
    for name in inputs:
        origin = inputs.input(name).origin
        out[name] = (origin.kind, origin.path) if origin is not None else None
    return out


def merge_plan(
    method: MergeMethod,
    pretrained: str | Path | CheckpointReader | Mapping[str, torch.Tensor],
    vectors: Mapping[str, TaskVector],
    dtype: str | torch.dtype | None,
    norm_stats: str | None,
) -> MergePlan:
    """This merge as tvq's config (``tvq_recipe.yml``): every option, the inputs, the tasks in order."""
    origins = _origins(vectors)
    packs = list(dict.fromkeys(Path(o[1]) for o in origins.values() if o is not None and o[0] == "pack"))
    finetuned = {name: Path(hub_id_of(o[1]) or o[1]) for name, o in origins.items() if o is not None and o[0] == "finetuned"}
    pre_path = hf_folder(pretrained) or (pretrained if isinstance(pretrained, (str, Path)) else getattr(pretrained, "path", None))
    dtype_name = dtype if isinstance(dtype, str) or dtype is None else str(dtype).removeprefix("torch.")
    options = method.options.model_dump(by_alias=True, mode="json")
    reference = (hub_id_of(pre_path) or pre_path) if pre_path else None  # a hub model as its id, not this machine's cache
    return MergePlan(Path(RECIPE_FILE), "tvq", method.name, options, Path(reference) if reference else None, packs, finetuned,
                     list(origins), dtype=dtype_name, norm_stats=norm_stats, task=method.task)  # fmt: skip


def emr_task_model(
    unified: str | Path,
    pretrained: str | Path | CheckpointReader,
    task: str,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = "same",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
    norm_stats: str | None = None,
    out_kind: OutKind = "auto",
) -> MergeReport:
    """Write one task's model θ_pre + λ_t (m_t ⊙ τ_uni) from a unified EMR pack, with the
    task's own running statistics (stored exactly in the pack) unless ``norm_stats`` says otherwise."""
    pack = open_emr(unified)
    pre = as_reader(pretrained)
    names = set(pre.keys())
    for key in [k for k in pack.stat_keys if k not in names or not pre.meta(k).is_float][:1]:
        raise PackError(f"{where(unified, f'stats.{key}')}: not a float tensor of the pretrained model {pre.path}")
    own = TaskInput(task, pack.task_vector(task), blocks=partial(pack.task_blocks, task))
    source = TaskSource(pre, TaskInputs([own]))
    for key in source.keys:  # refused before any output exists, not halfway through it
        if pack.shape(key) != source.shape(key):
            stored, expected = list(pack.shape(key)), list(source.shape(key))
            raise PackError(f"{where(unified, f'unified.{key}')}: shape {stored} differs from the pretrained model's {expected}")
    out = Path(out)
    protected = [Path(unified)] + ([Path(pretrained)] if isinstance(pretrained, (str, Path)) else [])
    check_output(out, overwrite, protected, kind=output_kind(out, hf_folder(pretrained), out_kind))
    if source.float_statistics and not pack.stat_keys:
        warnings.warn(
            f"{unified}: this unified pack predates per-task statistics: its running statistics were merged "
            "by EMR as weights (issue 14); write it again from the task vectors to get each task's own",
            NormStatsWarning,
            stacklevel=2,
        )
    stats = output_statistics(source, norm_stats, task, vectors={t: pack.task_vector(t) for t in pack.tasks}, warn=False)
    plan = MergePlan(Path(RECIPE_FILE), "tvq", "emr", pretrained=Path(pretrained) if isinstance(pretrained, (str, Path)) else Path(pre.path),
                     tasks=list(pack.tasks), dtype=None if dtype is None else str(dtype).removeprefix("torch."), norm_stats=norm_stats)  # fmt: skip
    files = card_files(plan, [], loadable=hf_folder(pretrained) is not None, unified=(Path(unified), task))  # README.md + tvq_recipe.sh
    own_task = _OwnTask(MethodOptions(), [task])  # large tensors by blocks: only their blocks of the pack are read
    work = LocalWork(pre, lambda key: source.tensor(task, key).clone(), BlockMerge(own_task, source))
    report = write_model(pre, work, set(source.keys), out, f"emr [{task}]", pack.tasks,
                         dtype=parse_dtype(dtype), hf_from=hf_folder(pretrained),
                         max_shard_size=parse_size(max_shard_size), progress=progress, overwrite=overwrite,
                         statistics=stats, out_kind=out_kind, files=files, tied=source.tied)  # fmt: skip
    report.bytes_read = pass_bytes(source) + (stats.bytes_read if stats is not None else 0)
    return report


class _OwnTask(MergeMethod):
    """One task's τ as it is (``emr_task_model``: λ_t (m_t ⊙ τ_uni) from the pack), elementwise,
    so that large tensors stream by blocks: θ_pre + τ, the bytes of the whole tensor."""

    elementwise = True

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        return taus[0].clone()


def write_task_folder(
    pack: Pack,
    task: str,
    out: str | Path,
    pretrained: str | Path | None,
    dtype: torch.dtype | None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    inputs: Sequence[Path] = (),
    max_shard_size: int | str = "5GB",
) -> MergeReport:
    """One pack task's model θ_pre + τ̂ as a folder (``tvq export --model --out-kind folder``):
    the same tensors as the exported file, written like a merge (shards, index, and the pretrained
    HF folder's config and tokenizer files, so ``from_pretrained`` loads it)."""
    out = Path(out)
    folder = hf_folder(pretrained) if pretrained is not None else None
    check_output(out, overwrite, [*inputs, *([folder] if folder is not None else [])], kind="dir")
    pre = pack.pretrained
    return write_model(pre, lambda key: pack.task_tensor(task, key).clone(), set(pack.keys), out, f"export {task}", [task],
                       dtype=dtype, hf_from=folder, max_shard_size=parse_size(max_shard_size), progress=progress,
                       overwrite=overwrite, out_kind="folder")  # fmt: skip


def write_model(
    pretrained: CheckpointReader,
    work: Deltas | LocalWork | RemoteWork,
    float_keys: set[str],
    out: Path,
    label: str,
    tasks: list[str],
    *,
    dtype: torch.dtype | None = None,
    hf_from: str | Path | None = None,
    max_shard_size: int = 5 * 10**9,
    progress: bool = False,
    executor: Executor | None = None,
    overwrite: bool = True,
    statistics: NormStats | None = None,
    out_kind: OutKind = "auto",
    files: Mapping[str, str] | None = None,
    tied: Mapping[str, str] | None = None,
) -> MergeReport:
    """Write θ_pre + δ atomically: a folder or one safetensors file (``output_kind``); a folder
    gets ``hf_from``'s config and tokenizer files, then ``files`` (name -> text: card, recipe).

    ``work`` gives δ: a function of the key (run in process), or jobs' work for ``executor``;
    ``statistics`` gives the running statistics (never merged; see ``tvq.merge.statistics``);
    ``tied`` names written as their first name's merged tensor (``TaskSource.tied``).
    ``overwrite=False`` refuses an ``out`` that another run created while this one worked."""
    if callable(work):
        work = LocalWork(pretrained, work)
    template = pickle_template(pretrained, out) if out_kind != "folder" else None
    stream = iter_model(pretrained, work, float_keys, dtype, f"merge {label}", progress, executor, len(tasks), statistics, tied)
    float_keys = float_keys | set(tied or {})  # cast like their first names (shard sizes)
    meta = {"format": "pt", "tvq_merge": label, "tvq_tasks": json.dumps(tasks)}
    if statistics is not None:
        meta["tvq_norm_stats"] = statistics.choice.label
        float_keys = float_keys | set(statistics.float_keys)  # cast to ``dtype`` as well (shard sizes)
    report = MergeReport(out, label, tasks, norm_stats=statistics.choice.label if statistics is not None else None)
    if template is not None:  # a .pt like the pretrained torch file: its program kept, its storages rewritten
        with atomic_file(out, overwrite=overwrite) as tmp:
            report.bytes_written = write_like(template, stream, tmp, dtype)
        report.files = [out]
        return report
    if output_kind(out, hf_from, out_kind) == "file":
        with atomic_file(out, overwrite=overwrite) as tmp:
            report.bytes_written = _write_shards(stream, [(tmp, pretrained.keys())], meta)
        report.files = [out]
        return report
    keys = pretrained.keys()
    sizes = {k: pretrained.meta(k).numel * _itemsize(dtype if k in float_keys else None, pretrained.meta(k).dtype) for k in keys}
    shards = _plan_shards(keys, sizes, max_shard_size)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        report.bytes_written = _write_shards(stream, [(tmp / n, g) for n, g in shards.items()], meta)
        if len(shards) > 1:
            weight_map = {k: n for n, g in shards.items() for k in g}
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if hf_from is not None:
            _copy_hf_files(Path(hf_from), tmp, dtype)
        write_files(tmp, files or {})
    report.files = sorted(out.iterdir())
    return report


def _whole(stream: Iterator[tuple[str, torch.Tensor | Chunked]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A stream without blocks (its work had none), typed as such."""
    for key, tensor in stream:
        if isinstance(tensor, Chunked):
            raise RuntimeError(f"'{key}' came by blocks to a writer of whole tensors")
        yield key, tensor


def output_kind(out: Path, hf_from: str | Path | None, out_kind: OutKind = "auto") -> Kind:
    """What ``write_model`` writes at ``out``: a folder, or one safetensors file. ``auto``: a
    Hugging Face folder when the pretrained model is one (``hf_from``) and ``out`` does not end
    in ``.safetensors``, else a file."""
    if out_kind not in ("auto", "folder", "file"):
        raise ConfigError(f"--out-kind {out_kind!r}: expected auto, folder or file")
    if out_kind != "auto":
        return "dir" if out_kind == "folder" else "file"
    return "file" if hf_from is None or Path(out).suffix == ".safetensors" else "dir"


def _itemsize(dtype: torch.dtype | None, stored: torch.dtype) -> int:
    return (dtype or stored).itemsize


def _plan_shards(keys: list[str], sizes: dict[str, int], limit: int) -> dict[str, list[str]]:
    """File name -> its tensors, by ``huggingface_hub``'s rule (as ``save_pretrained``): greedy
    in key order, a tensor larger than ``limit`` in a shard of its own; planned from the sizes
    alone (the tensors are merged later, one at a time). One shard is ``model.safetensors``."""
    if not keys:
        return {SINGLE_FILE: []}
    split = split_state_dict_into_shards_factory(
        {k: sizes[k] for k in keys}, get_storage_size=int, filename_pattern=SHARD_PATTERN, max_shard_size=limit
    )
    return {name: list(names) for name, names in split.filename_to_tensors.items()}


def _write_shards(stream: Iterator[tuple[str, torch.Tensor | Chunked]], shards: list[tuple[Path, list[str]]], meta: dict[str, str]) -> int:
    """Consume the stream in key order, each tensor into its shard (all shards open at once: a
    shard need not hold a contiguous run of keys); returns the bytes written."""
    total = 0
    with ExitStack() as stack:
        writers: dict[str, StreamingSafetensorsWriter] = {}
        remaining: dict[Path, int] = {}
        by_path: dict[Path, StreamingSafetensorsWriter] = {}
        for path, names in shards:
            writer = StreamingSafetensorsWriter(path, list(names), meta)
            stack.callback(writer.abort)
            by_path[path], remaining[path] = writer, len(names)
            writers.update(dict.fromkeys(names, writer))
        owner = {k: path for path, names in shards for k in names}
        for key, tensor in stream:
            if isinstance(tensor, Chunked):
                writers[key].add_chunks(key, tensor.dtype, tensor.shape, tensor.chunks)
            else:
                writers[key].add(key, tensor)
            path = owner[key]
            remaining[path] -= 1
            if remaining[path] == 0:
                total += by_path[path].close()
        for path, left in remaining.items():
            if left:  # the stream ended early: a bug, not an input problem
                raise RuntimeError(f"{path.name}: {left} tensors never arrived")
    return total


def _copy_hf_files(src: Path, dst: Path, dtype: torch.dtype | None) -> None:
    """Config, tokenizer and other small top-level files; weights are not copied."""
    for item in sorted(src.iterdir()):
        if not item.is_file() or item.name.startswith(".") or is_weight_file(item.name):
            continue
        shutil.copy2(item, dst / item.name)
    config = dst / "config.json"
    if dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        name = str(dtype).removeprefix("torch.")
        for field_name in ("torch_dtype", "dtype"):
            if field_name in data:
                data[field_name] = name
        config.write_text(json.dumps(data, indent=2) + "\n")
