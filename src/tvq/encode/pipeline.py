"""FQ / TVQ / RTVQ: turn one pretrained and T fine-tuned checkpoints into a pack.

Everything streams tensor by tensor: one job per tensor (tvq.encode.key; a large TVQ tensor of
many tasks, one per group of tasks), run by any executor, its results written in key order.
Peak memory is about (T + 3) x the largest tensor whatever the model size (TVQ: about 7 x,
whatever T). Arithmetic is fp32, as in the paper's code, and the
operations are the paper's, in its order, so the stored codes are bit-identical to its output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from tvq.device import parse_device
from tvq.encode.checks import check_finite
from tvq.encode.job import BASE, PRETRAINED, KeyJob, KeyResult, Source, task_groups
from tvq.encode.key import encode_key
from tvq.encode.options import QuantizeOptions
from tvq.errors import CheckpointError, ConfigError, where
from tvq.execute import Executor, LocalExecutor
from tvq.io.atomic import atomic_dir, atomic_file, check_distinct_outputs, check_output
from tvq.io.content_hash import DEFAULT_ALGORITHM, algorithm_of, labelled, new_hasher
from tvq.io.hub import hub_reference
from tvq.io.readers import CheckpointReader, open_checkpoint
from tvq.io.safetensors_writer import StreamingSafetensorsWriter
from tvq.pack.card import write_pack_card
from tvq.pack.manifest import MANIFEST_NAME, InputRef, Manifest, TaskEntry, announced_names, written_version
from tvq.pack.writer import PackFileWriter, close_all
from tvq.quant.chunks import mean_of
from tvq.quant.schemes import get_scheme
from tvq.quant.selection import KeyRule, TensorRole, tensor_role
from tvq.vector import check_compatible
from tvq.version import __version__


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


def task_file_name(index: int, name: str) -> str:
    return f"tasks/{index:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:80]}.safetensors"


def reader_of(source: Source, unsafe_pickle: bool) -> CheckpointReader:
    return open_checkpoint(source, unsafe_pickle) if isinstance(source, (str, Path)) else source


def input_ref(path: str | Path, digest: InputDigest, reader: CheckpointReader, given: object = None) -> InputRef:
    """How the pack names an input: the hub id it was given as (portable: another machine
    resolves it too), else its absolute path; the digest identifies it either way."""
    name = str(given) if isinstance(given, (str, Path)) and hub_reference(given) else str(Path(path).resolve())
    return InputRef(path=name, digest=digest.hexdigest(), fp32_bytes=reader.float_bytes())


def check_task_names(finetuned: Mapping[str, object]) -> None:
    if not finetuned:
        raise ConfigError("no fine-tuned checkpoints given (use --finetuned NAME=PATH)")
    for name in finetuned:
        if not name or name != name.strip():
            raise ConfigError(f"invalid task name {name!r}")


def reference_of(options: QuantizeOptions) -> Literal["avg", "quantized_base"] | None:
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
    quantized: frozenset[str] = frozenset()  # keys of quantized tensors (the others are stored exactly)
    ref_sq_quantized: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0

    @classmethod
    def for_tasks(cls, names: list[str], algorithm: str = DEFAULT_ALGORITHM, quantized: Iterable[str] = ()) -> StreamStats:
        digests = {n: InputDigest(algorithm) for n in [PRETRAINED, *names]}
        zeros = lambda: dict.fromkeys(names, 0.0)  # noqa: E731
        return cls(digests, zeros(), zeros(), frozenset(quantized), zeros())

    def add(self, result: KeyResult) -> None:
        self.bytes_read += result.bytes_read
        for name, line in result.digests.items():
            self.digests[name].update(line)
        quantized = result.key in self.quantized
        for name, (err, ref) in result.errors.items():
            self.err_sq[name] += err
            self.ref_sq[name] += ref
            if quantized:
                self.ref_sq_quantized[name] += ref

    def task_entry(self, name: str, file: str, path: str | Path, reader: CheckpointReader,
                   reference: Literal["avg", "quantized_base"] | None = None, given: object = None) -> TaskEntry:  # fmt: skip
        err, ref, ref_q = self.err_sq[name], self.ref_sq[name], self.ref_sq_quantized[name]
        return TaskEntry(
            name=name,
            file=file,
            source=input_ref(path, self.digests[name], reader, given),
            rel_error=(err / ref) ** 0.5 if ref > 0 else 0.0,
            rel_error_quantized=(err / ref_q) ** 0.5 if ref_q > 0 else 0.0,  # exact tensors add no error
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
    pretrained: Source,
    finetuned: Mapping[str, Source],
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
    device: str | torch.device | None = None,
) -> QuantizeReport:
    """Write a pack of quantized task vectors (and, optionally, the averaged fine-tuned model).

    Inputs are paths or already-open readers. ``expect_digests`` (task -> content hash)
    makes the write fail, leaving nothing behind, if an input is not the expected one.
    Inputs are hashed with ``digest_algorithm`` (or that of the expected digests).
    ``device`` (cpu, cuda, cuda:N) is where the streamed min–max math runs (tvq.device): the same
    pack, error statistics aside.
    """
    compute = str(parse_device(device))
    options = options.validated()
    check_task_names(finetuned)
    out = Path(out)
    pre = reader_of(pretrained, unsafe_pickle)
    readers: dict[str, CheckpointReader] = {name: reader_of(p, unsafe_pickle) for name, p in finetuned.items()}
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
    pre_src: Source = pretrained if remote and isinstance(pretrained, (str, Path)) else pre
    ft_src: dict[str, Source] = {n: (p if remote and isinstance(p, (str, Path)) else readers[n]) for n, p in finetuned.items()}
    if expect_digests:
        digest_algorithm = algorithm_of(next(iter(expect_digests.values())))
    jobs = [
        group
        for k in keys
        for group in task_groups(KeyJob(k, roles[k], pre_src, ft_src, options, with_average=average_out is not None,
                                        unsafe_pickle=unsafe_pickle, digest_algorithm=digest_algorithm, device=compute))
    ]  # fmt: skip

    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out, overwrite=overwrite))
        avg_tmp = stack.enter_context(atomic_file(Path(average_out), overwrite=overwrite)) if average_out is not None else None
        task_files = {name: task_file_name(i, name) for i, name in enumerate(names)}
        aux = get_scheme(options.quantizer).aux_names
        task_names = announced_names(float_keys, set(quant_keys), aux)
        writers = {name: PackFileWriter(tmp, task_files[name], task_names, {"task": name}) for name in names}
        if options.residual:
            writers[BASE] = PackFileWriter(tmp, "base.safetensors", announced_names(quant_keys, set(quant_keys), aux), {"role": "base"})
        avg_writer = StreamingSafetensorsWriter(avg_tmp, keys, {"format": "pt"}) if avg_tmp is not None else None
        all_writers: list[PackFileWriter | StreamingSafetensorsWriter] = [*writers.values(), *([avg_writer] if avg_writer else [])]
        stack.callback(lambda: [w.abort() for w in all_writers])  # closes handles; no-op once closed
        stats = StreamStats.for_tasks(names, digest_algorithm, quant_keys)
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
            version=written_version(file_entries),
            created_by=f"tvq {__version__}",
            method=options.method(),
            pretrained=input_ref(pre.path, stats.digests[PRETRAINED], pre, given=pretrained),
            tasks=[stats.task_entry(name, task_files[name], readers[name].path, readers[name], reference_of(options), given=finetuned[name])
                   for name in names],
            base_file="base.safetensors" if options.residual else None,
            skipped=[k for k in keys if roles[k] == TensorRole.SKIP],
            files=file_entries,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        write_pack_card(tmp, manifest)
    written = sum(f.bytes for f in manifest.files.values()) + (out / MANIFEST_NAME).stat().st_size
    return QuantizeReport(manifest=manifest, bytes_read=stats.bytes_read, bytes_written=written)


def average_checkpoints(
    finetuned: Mapping[str, str | Path], out: str | Path, *, overwrite: bool = False, unsafe_pickle: bool = False, progress: bool = True
) -> None:
    """θ_avg = (1/T) Σ θ_t, the paper's avg_ft_model, streamed to a safetensors file."""
    check_task_names(finetuned)
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
                for r, t in zip(readers, tensors, strict=True):
                    check_finite(t, r.path, key)
                mean = mean_of([t.float() for t in tensors])
                if not bool(torch.isfinite(mean.sum(dtype=torch.float32))) and not bool(torch.isfinite(mean).all()):
                    raise CheckpointError(f"{where(first.path, key)}: the average of the fine-tuned checkpoints overflows float32")
                writer.add(key, mean.to(t0.dtype))
            writer.close()
        except BaseException:
            writer.abort()
            raise
