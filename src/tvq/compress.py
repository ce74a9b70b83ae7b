"""FQ / TVQ / RTVQ: turn one pretrained and T fine-tuned checkpoints into a pack.

Everything streams tensor by tensor: peak memory is about (T + 3) x the largest tensor,
whatever the model size. Arithmetic is fp32, as in the paper's code, and the operations
are the paper's, in its order, so the stored codes are bit-identical to its output.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from tvq import __version__
from tvq.errors import CheckpointError, ConfigError, where
from tvq.io.atomic import atomic_dir, atomic_file, check_distinct_outputs, check_output
from tvq.io.content_hash import DEFAULT_ALGORITHM, algorithm_of, labelled, new_hasher
from tvq.io.readers import CheckpointReader, open_checkpoint
from tvq.io.safetensors_writer import StreamingSafetensorsWriter
from tvq.encode import BASE, PRETRAINED, KeyJob, KeyResult, check_finite, encode_key, mean_of
from tvq.execute import Executor, LocalExecutor
from tvq.pack.manifest import MANIFEST_NAME, InputRef, Manifest, Method, TaskEntry
from tvq.pack.validate import MAX_GROUP_SIZE
from tvq.pack.writer import PackFileWriter, announced_names, close_all
from tvq.quant.minmax import check_bits
from tvq.quant.schemes import get_scheme
from tvq.quant.selection import KeyRule, TensorRole, tensor_role
from tvq.vector import check_compatible


@dataclass
class BitPlan:
    """Bit widths chosen per tensor (and for the RTVQ base) under a memory budget."""

    budget_bits: float
    bits: dict[str, int]
    base_bits: dict[str, int] = field(default_factory=dict)
    budget_bytes: int | None = None

    def get(self, key: str, base: bool = False) -> int | None:
        return (self.base_bits if base else self.bits).get(key)


@dataclass
class QuantizeOptions:
    """What to quantize and how; mirrors the paper's quantize_config.json."""

    target: Literal["task_vector", "finetuned"] = "task_vector"
    bits: int = 4
    residual: bool = False
    base_bits: int | None = None
    error_correction: bool = False
    key_rule: KeyRule = KeyRule.NDIM
    quantizer: str = "minmax"  # see tvq.quant.schemes; "minmax" is the paper's
    group_size: int = 128  # for quantizer="group"
    # per-tensor bit widths chosen by tvq.allocate (None: ``bits``/``base_bits`` everywhere)
    bit_plan: BitPlan | None = None

    def bits_for(self, key: str, base: bool = False) -> int:
        if self.bit_plan is not None:
            planned = self.bit_plan.get(key, base)
            if planned is not None:
                return planned
        return self.base_bits if base else self.bits

    def scheme_options(self) -> dict:
        return {"group_size": self.group_size} if self.quantizer == "group" else {}

    def validated(self) -> QuantizeOptions:
        check_bits(self.bits, "bits")
        if self.target not in ("task_vector", "finetuned"):
            raise ConfigError(f"target={self.target!r} is unknown: choose task_vector or finetuned")
        if self.residual:
            if self.target != "task_vector":
                raise ConfigError("residual (RTVQ) quantization needs target=task_vector")
            if self.base_bits is None:
                self.base_bits = min(8, self.bits + 1)
            check_bits(self.base_bits, "base_bits")
            get_scheme(self.quantizer, self.base_bits)
        elif self.error_correction:
            raise ConfigError("error_correction only applies to residual (RTVQ) quantization")
        get_scheme(self.quantizer, self.bits)
        if self.quantizer == "group" and not (isinstance(self.group_size, int) and 2 <= self.group_size <= MAX_GROUP_SIZE):
            raise ConfigError(
                f"group_size={self.group_size!r} must be an integer from 2 to {MAX_GROUP_SIZE} "
                "(the most a pack may record; a group larger than a tensor is the whole tensor)"
            )
        return self

    def method(self) -> Method:
        return Method(
            target=self.target,
            residual=self.residual,
            bits=self.bits,
            base_bits=self.base_bits if self.residual else None,
            error_correction=self.error_correction,
            key_rule=KeyRule(self.key_rule).value,
            quantizer=self.quantizer,
            group_size=self.group_size if self.quantizer == "group" else None,
            budget_bits=self.bit_plan.budget_bits if self.bit_plan is not None else None,
        )


class InputDigest:
    """Content hash of a checkpoint: a hash over per-tensor digest lines, keys sorted.

    The lines are computed where each tensor is read (any worker), so hashing runs in
    parallel and the result does not depend on the executor."""

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM) -> None:
        self.algorithm = algorithm
        self._h = new_hasher(algorithm)

    def update(self, line: str) -> None:
        self._h.update(line.encode())

    def hexdigest(self) -> str:
        """The stored form, naming its algorithm (``blake3:<hex>``; bare hex for sha256)."""
        return labelled(self.algorithm, self._h.hexdigest())


@dataclass
class QuantizeReport:
    manifest: Manifest
    bytes_read: int
    bytes_written: int


def _safe_file_name(index: int, name: str) -> str:
    return f"tasks/{index:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:80]}.safetensors"


def _as_reader(source, unsafe_pickle: bool) -> CheckpointReader:
    return source if hasattr(source, "get") else open_checkpoint(source, unsafe_pickle)


def _input_ref(path: str | Path, digest: InputDigest, reader: CheckpointReader) -> InputRef:
    return InputRef(path=str(Path(path).resolve()), digest=digest.hexdigest(), fp32_bytes=reader.float_bytes())


def _check_task_names(finetuned: dict[str, object]) -> None:
    if not finetuned:
        raise ConfigError("no fine-tuned checkpoints given (use --finetuned NAME=PATH)")
    for name in finetuned:
        if not name or name != name.strip():
            raise ConfigError(f"invalid task name {name!r}")


def _reference(options: QuantizeOptions) -> str | None:
    if not options.residual:
        return None
    return "quantized_base" if options.error_correction else "avg"


def roles_for(pre: CheckpointReader, rule: KeyRule) -> dict[str, TensorRole]:
    return {k: tensor_role(k, pre.meta(k), rule) for k in sorted(pre.keys())}


@dataclass
class StreamStats:
    """What the encoding pass measured: input content hashes, errors, bytes read."""

    digests: dict[str, InputDigest]
    err_sq: dict[str, float]
    ref_sq: dict[str, float]
    bytes_read: int = 0

    @classmethod
    def for_tasks(cls, names: list[str], algorithm: str = DEFAULT_ALGORITHM) -> StreamStats:
        digests = {n: InputDigest(algorithm) for n in [PRETRAINED, *names]}
        return cls(digests, dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0))

    def add(self, result: KeyResult) -> None:
        self.bytes_read += result.bytes_read
        for name, line in result.digests.items():
            self.digests[name].update(line)
        for name, (err, ref) in result.errors.items():
            self.err_sq[name] += err
            self.ref_sq[name] += ref

    def task_entry(self, name: str, file: str, path: str | Path, reader: CheckpointReader, reference: str | None = None) -> TaskEntry:
        err, ref = self.err_sq[name], self.ref_sq[name]
        return TaskEntry(
            name=name,
            file=file,
            source=_input_ref(path, self.digests[name], reader),
            rel_error=(err / ref) ** 0.5 if ref > 0 else 0.0,
            reference=reference,
        )


def encode_all(
    jobs: list[KeyJob],
    writers: dict[str, PackFileWriter],
    stats: StreamStats,
    executor: Executor | None = None,
    avg_writer: StreamingSafetensorsWriter | None = None,
    desc: str = "quantize",
    progress: bool = True,
) -> None:
    """Run the jobs (any executor) and write each result, in key order, to its files."""
    executor = executor or LocalExecutor()
    results = executor.map(encode_key, jobs)
    for result in tqdm(results, total=len(jobs), desc=desc, unit="tensor", disable=not progress):
        stats.add(result)
        for file_id, stored in result.stored.items():
            writers[file_id].add(result.key, stored)
        if avg_writer is not None and result.average is not None:
            avg_writer.add(result.key, result.average)


def quantize(
    pretrained: str | Path,
    finetuned: dict[str, str | Path],
    out: str | Path,
    options: QuantizeOptions,
    *,
    average_out: str | Path | None = None,
    overwrite: bool = False,
    unsafe_pickle: bool = False,
    progress: bool = True,
    expect_digests: dict[str, str] | None = None,
    executor: Executor | None = None,
    digest_algorithm: str = DEFAULT_ALGORITHM,
) -> QuantizeReport:
    """Write a pack of quantized task vectors (and, optionally, the averaged fine-tuned model).

    Inputs are paths or already-open readers. ``expect_digests`` (task -> content hash)
    makes the write fail, leaving nothing behind, if an input is not the expected one.
    Inputs are hashed with ``digest_algorithm`` (or that of the expected digests).
    """
    options = options.validated()
    _check_task_names(finetuned)
    out = Path(out)
    pre = _as_reader(pretrained, unsafe_pickle)
    readers: dict[str, CheckpointReader] = {name: _as_reader(p, unsafe_pickle) for name, p in finetuned.items()}
    for reader in readers.values():
        check_compatible(pre, reader)
    inputs = [Path(pre.path), *(Path(r.path) for r in readers.values())]
    check_output(out, overwrite, inputs, kind="dir")
    if average_out is not None:
        check_output(Path(average_out), overwrite, inputs, kind="file")
        check_distinct_outputs(out, Path(average_out))

    roles = roles_for(pre, options.key_rule)
    keys = list(roles)
    float_keys = [k for k in keys if roles[k] != TensorRole.SKIP]
    quant_keys = [k for k in float_keys if roles[k] == TensorRole.QUANTIZE]
    if not float_keys:
        raise CheckpointError(f"{where(pre.path)}: no floating-point tensors to quantize")
    names = list(readers)
    # Remote workers get paths (jobs must be shipped); local ones the readers opened above.
    remote = getattr(executor, "remote", False)
    pre_src = pretrained if remote and not hasattr(pretrained, "get") else pre
    ft_src = {n: (p if remote and not hasattr(p, "get") else readers[n]) for n, p in finetuned.items()}
    if expect_digests:
        digest_algorithm = algorithm_of(next(iter(expect_digests.values())))
    jobs = [
        KeyJob(k, roles[k], pre_src, ft_src, options, with_average=average_out is not None, unsafe_pickle=unsafe_pickle,
               digest_algorithm=digest_algorithm)
        for k in keys
    ]

    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out, overwrite=overwrite))
        avg_tmp = stack.enter_context(atomic_file(Path(average_out), overwrite=overwrite)) if average_out is not None else None
        task_files = {name: _safe_file_name(i, name) for i, name in enumerate(names)}
        aux = get_scheme(options.quantizer).aux_names
        task_names = announced_names(float_keys, set(quant_keys), aux)
        writers = {name: PackFileWriter(tmp, task_files[name], task_names, {"task": name}) for name in names}
        if options.residual:
            writers[BASE] = PackFileWriter(tmp, "base.safetensors", announced_names(quant_keys, set(quant_keys), aux), {"role": "base"})
        avg_writer = StreamingSafetensorsWriter(avg_tmp, keys, {"format": "pt"}) if avg_tmp is not None else None
        all_writers = [*writers.values(), *([avg_writer] if avg_writer else [])]
        stack.callback(lambda: [w.abort() for w in all_writers])  # closes handles; no-op once closed
        stats = StreamStats.for_tasks(names, digest_algorithm)
        encode_all(jobs, writers, stats, executor, avg_writer, f"quantize {options.method().label}", progress)
        for name, digest in (expect_digests or {}).items():
            if stats.digests[name].hexdigest() != digest:
                raise CheckpointError(f"{where(readers[name].path)}: content differs from the expected checkpoint of task {name!r}")
        closed = close_all(writers)
        file_entries = {task_files[name]: closed[name] for name in names}
        if options.residual:
            file_entries["base.safetensors"] = closed[BASE]
        if avg_writer is not None:
            avg_writer.close()

        manifest = Manifest(
            created_by=f"tvq {__version__}",
            method=options.method(),
            pretrained=_input_ref(pre.path, stats.digests[PRETRAINED], pre),
            tasks=[stats.task_entry(name, task_files[name], readers[name].path, readers[name], _reference(options)) for name in names],
            base_file="base.safetensors" if options.residual else None,
            skipped=[k for k in keys if roles[k] == TensorRole.SKIP],
            files=file_entries,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    written = sum(f.bytes for f in manifest.files.values()) + (out / MANIFEST_NAME).stat().st_size
    return QuantizeReport(manifest=manifest, bytes_read=stats.bytes_read, bytes_written=written)


def average_checkpoints(
    finetuned: dict[str, str | Path], out: str | Path, *, overwrite: bool = False, unsafe_pickle: bool = False, progress: bool = True
) -> None:
    """θ_avg = (1/T) Σ θ_t, the paper's avg_ft_model, streamed to a safetensors file."""
    _check_task_names(finetuned)
    readers = [open_checkpoint(p, unsafe_pickle) for p in finetuned.values()]
    first = readers[0]
    for r in readers[1:]:
        check_compatible(first, r)
    out = Path(out)
    check_output(out, overwrite, [Path(p) for p in finetuned.values()], kind="file")
    keys = sorted(first.keys())
    with atomic_file(out, overwrite=overwrite) as tmp:
        writer = StreamingSafetensorsWriter(tmp, keys, {"format": "pt"})
        try:
            for key in tqdm(keys, desc="average", unit="tensor", disable=not progress):
                t0 = first.get(key)
                if not t0.is_floating_point():
                    writer.add(key, t0)
                    continue
                tensors = [r.get(key) for r in readers]
                for r, t in zip(readers, tensors):
                    check_finite(t, r.path, key)
                mean = mean_of([t.float() for t in tensors])
                if not bool(torch.isfinite(mean.sum(dtype=torch.float32))) and not bool(torch.isfinite(mean).all()):
                    raise CheckpointError(f"{where(first.path, key)}: the average of the fine-tuned checkpoints overflows float32")
                writer.add(key, mean.to(t0.dtype))
            writer.close()
        except BaseException:
            writer.abort()
            raise
