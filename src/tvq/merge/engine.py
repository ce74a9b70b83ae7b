"""Running a merge: stream tensors through a method and write a model (file or HF folder).

Per tensor: stack the T task vectors (fp32), let the method merge them, add θ_pre in place,
cast to the output dtype, append to the output. Peak memory ≈ (T + 2) × the largest tensor
plus the method's temporaries and the output buffer, whatever the model size.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tvq.errors import ConfigError
from tvq.io.atomic import atomic_dir, atomic_file, check_output
from tvq.io.readers import CheckpointReader
from tvq.merge.registry import MergeMethod, MethodOptions, build_method
from tvq.merge.source import TaskSource, as_reader
from tvq.io.safetensors_writer import StreamingSafetensorsWriter
from tvq.vector import TaskVector

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".index.json")
SINGLE_FILE = "model.safetensors"
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


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``same``/None keeps each tensor's pretrained dtype; otherwise float32/float16/bfloat16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "same":
        return None
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"--dtype {dtype!r} is unknown: choose same, float32, float16 or bfloat16") from None


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
    p = Path(pretrained) if isinstance(pretrained, (str, Path)) else Path(getattr(pretrained, "path", ""))
    if p.is_file() and p.name in ("model.safetensors", "pytorch_model.bin"):
        p = p.parent
    return p if p.is_dir() and (p / "config.json").is_file() else None


def iter_model(
    pretrained: CheckpointReader, deltas: Deltas, float_keys: set[str], dtype: torch.dtype | None, desc: str, progress: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """θ_pre + δ for float keys (fp32 arithmetic, then cast), other tensors copied as they are."""
    for key in tqdm(pretrained.keys(), desc=desc, unit="tensor", disable=not progress):
        base = pretrained.get(key)
        if key not in float_keys:
            yield key, base
            continue
        merged = deltas(key).add_(base.float()).to(dtype or base.dtype)
        yield key, merged
        del base, merged  # before the next tensor is computed


def method_deltas(method: MergeMethod, source: TaskSource) -> Deltas:
    return lambda key: method.merge_tensor(key, source.stack(key))


def merge_state_dict(
    method: str,
    pretrained: str | Path | CheckpointReader | Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, TaskVector],
    options: Mapping[str, Any] | MethodOptions | None = None,
    *,
    task: str | None = None,
    dtype: str | torch.dtype | None = "same",
) -> dict[str, torch.Tensor]:
    """The merged model in memory (small models, tests): the same stream, collected in a dict."""
    pre = as_reader(pretrained)
    source = TaskSource(pre, task_vectors)
    m = build_method(method, options, source.tasks, task)
    if m.per_task and task is None:
        raise ConfigError(f"{m.name} merges into one model per task: pass task=NAME")
    m.prepare(source)
    return dict(iter_model(pre, method_deltas(m, source), set(source.keys), parse_dtype(dtype), m.name, False))


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
) -> MergeReport:
    """Merge ``task_vectors`` into ``pretrained`` with ``method`` and write the result to ``out``.

    A Hugging Face pretrained folder gives a Hugging Face folder (sharded above
    ``max_shard_size``, config and tokenizer files copied) unless ``out`` ends in
    ``.safetensors``; otherwise one safetensors file. Per-task methods (EMR) write their
    unified pack, or with ``task=NAME`` that task's model. ``inputs`` are paths that must not
    be overwritten (the pretrained path is always protected).
    """
    pre = as_reader(pretrained)
    source = TaskSource(pre, task_vectors)
    m = build_method(method, options, source.tasks, task)
    out = Path(out)
    protected = [Path(p) for p in inputs] + ([Path(pretrained)] if isinstance(pretrained, (str, Path)) else [])
    folder = hf_folder(pretrained)
    if folder is not None:
        protected.append(folder)
    check_output(out, overwrite, protected)
    dtype_ = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if m.per_task and task is None:
        with atomic_file(out) as tmp:
            m.write_pack(source, tmp, progress)
        return MergeReport(out, m.name, source.tasks, [out], out.stat().st_size)
    m.prepare(source, progress)
    label = f"{m.name}" + (f" [{task}]" if task else "")
    return write_model(pre, method_deltas(m, source), set(source.keys), out, label, source.tasks, dtype=dtype_,
                       hf_from=hf_folder(pretrained), max_shard_size=shard_bytes, progress=progress)  # fmt: skip


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
) -> MergeReport:
    """Write one task's model θ_pre + λ_t (m_t ⊙ τ_uni) from a unified EMR pack."""
    from tvq.merge.methods.emr import open_emr

    pack = open_emr(unified)
    pre = as_reader(pretrained)
    source = TaskSource(pre, {task: pack.task_vector(task)})
    out = Path(out)
    protected = [Path(unified)] + ([Path(pretrained)] if isinstance(pretrained, (str, Path)) else [])
    check_output(out, overwrite, protected)
    return write_model(pre, lambda key: source.tensor(task, key).clone(), set(source.keys), out, f"emr [{task}]", pack.tasks,
                       dtype=parse_dtype(dtype), hf_from=hf_folder(pretrained),
                       max_shard_size=parse_size(max_shard_size), progress=progress)  # fmt: skip


def write_model(
    pretrained: CheckpointReader,
    deltas: Deltas,
    float_keys: set[str],
    out: Path,
    label: str,
    tasks: list[str],
    *,
    dtype: torch.dtype | None = None,
    hf_from: str | Path | None = None,
    max_shard_size: int = 5 * 10**9,
    progress: bool = False,
) -> MergeReport:
    """Write θ_pre + δ atomically: a Hugging Face folder when ``hf_from`` is given (and ``out`` is not a .safetensors path)."""
    stream = iter_model(pretrained, deltas, float_keys, dtype, f"merge {label}", progress)
    meta = {"format": "pt", "tvq_merge": label, "tvq_tasks": json.dumps(tasks)}
    report = MergeReport(out, label, tasks)
    if hf_from is None or out.suffix == ".safetensors":
        with atomic_file(out) as tmp:
            report.bytes_written = _write_shards(stream, [(tmp, pretrained.keys())], meta)
        report.files = [out]
        return report
    keys = pretrained.keys()
    sizes = {k: pretrained.meta(k).numel * _itemsize(dtype if k in float_keys else None, pretrained.meta(k).dtype) for k in keys}
    groups = _plan_shards(keys, sizes, max_shard_size)
    names = [SINGLE_FILE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    with atomic_dir(out) as tmp:
        report.bytes_written = _write_shards(stream, [(tmp / n, g) for n, g in zip(names, groups, strict=True)], meta)
        if len(groups) > 1:
            weight_map = {k: n for n, g in zip(names, groups, strict=True) for k in g}
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        _copy_hf_files(Path(hf_from), tmp, dtype)
    report.files = sorted(out.iterdir())
    return report


def _itemsize(dtype: torch.dtype | None, stored: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype or stored).element_size()


def _plan_shards(keys: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Greedy, in key order (like transformers): a new shard when the next tensor would not fit."""
    groups: list[list[str]] = [[]]
    used = 0
    for key in keys:
        if groups[-1] and used + sizes[key] > limit:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += sizes[key]
    return groups


def _write_shards(stream: Iterator[tuple[str, torch.Tensor]], shards: list[tuple[Path, list[str]]], meta: dict[str, str]) -> int:
    """Consume the stream in order, shard after shard; returns the bytes written."""
    total = 0
    with ExitStack() as stack:
        for path, names in shards:
            writer = StreamingSafetensorsWriter(path, list(names), meta)
            stack.callback(writer.abort)
            for expected in names:
                key, tensor = next(stream)
                assert key == expected, (key, expected)
                writer.add(key, tensor)
            total += writer.close()
    return total


def _copy_hf_files(src: Path, dst: Path, dtype: torch.dtype | None) -> None:
    """Config, tokenizer and other small top-level files; weights are not copied."""
    for item in sorted(src.iterdir()):
        if not item.is_file() or item.name.startswith(".") or item.name.endswith(WEIGHT_SUFFIXES):
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
