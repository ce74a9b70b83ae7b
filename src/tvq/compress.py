"""FQ / TVQ / RTVQ: turn one pretrained and T fine-tuned checkpoints into a pack.

Everything streams tensor by tensor: peak memory is about (T + 3) x the largest tensor,
whatever the model size. Arithmetic is fp32, as in the paper's code, and the operations
are the paper's, in its order, so the stored codes are bit-identical to its output.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from tvq import __version__
from tvq.errors import CheckpointError, ConfigError, where
from tvq.io.atomic import atomic_dir, atomic_file, check_output
from tvq.io.readers import CheckpointReader, open_checkpoint
from tvq.io.safetensors_writer import StreamingSafetensorsWriter
from tvq.pack.manifest import MANIFEST_NAME, InputRef, Manifest, Method, TaskEntry
from tvq.pack.writer import PackFileWriter, announced_names
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
        if self.quantizer == "group" and not (isinstance(self.group_size, int) and self.group_size >= 2):
            raise ConfigError(f"group_size={self.group_size!r} must be an integer >= 2")
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


@dataclass
class _Digest:
    """Content hash of a checkpoint's float tensors, fed in sorted-key order as they stream by."""

    h: "hashlib._Hash" = field(default_factory=hashlib.sha256)

    def update(self, key: str, t: torch.Tensor) -> None:
        from tvq.io.safetensors_writer import tensor_bytes

        self.h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        self.h.update(tensor_bytes(t))

    def hexdigest(self) -> str:
        return self.h.hexdigest()


@dataclass
class QuantizeReport:
    manifest: Manifest
    bytes_read: int
    bytes_written: int


def _safe_file_name(index: int, name: str) -> str:
    return f"tasks/{index:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:80]}.safetensors"


def _check_finite(t: torch.Tensor, path: Path, key: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{where(path, key)}: contains NaN or Inf")


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum in order, then divide: the paper's get_avg_model_statedict, bit for bit, except
    that the mean of identical tensors is that tensor. (In fp32 (x+x+x)/3 != x; for a tensor
    no task changed, that rounding noise would cost RTVQ a full base and noisy offsets.)"""
    if all(torch.equal(t, tensors[0]) for t in tensors[1:]):
        return tensors[0].clone()
    total = torch.zeros_like(tensors[0])
    for t in tensors:
        total += t
    return total / len(tensors)


def _as_reader(source, unsafe_pickle: bool) -> CheckpointReader:
    return source if hasattr(source, "get") else open_checkpoint(source, unsafe_pickle)


def _input_ref(path: str | Path, digest: _Digest, reader: CheckpointReader) -> InputRef:
    return InputRef(path=str(Path(path).resolve()), digest=digest.hexdigest(), fp32_bytes=reader.float_bytes())


def _check_task_names(finetuned: dict[str, object]) -> None:
    if not finetuned:
        raise ConfigError("no fine-tuned checkpoints given (use --finetuned NAME=PATH)")
    for name in finetuned:
        if not name or name != name.strip():
            raise ConfigError(f"invalid task name {name!r}")


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
) -> QuantizeReport:
    """Write a pack of quantized task vectors (and, optionally, the averaged fine-tuned model).

    Inputs are paths or already-open readers. ``expect_digests`` (task -> content hash)
    makes the write fail, leaving nothing behind, if an input is not the expected one.
    """
    options = options.validated()
    _check_task_names(finetuned)
    out = Path(out)
    pre = _as_reader(pretrained, unsafe_pickle)
    readers: dict[str, CheckpointReader] = {name: _as_reader(p, unsafe_pickle) for name, p in finetuned.items()}
    for reader in readers.values():
        check_compatible(pre, reader)
    inputs = [Path(pre.path), *(Path(r.path) for r in readers.values())]
    check_output(out, overwrite, inputs)
    if average_out is not None:
        check_output(Path(average_out), overwrite, inputs)

    keys = sorted(pre.keys())
    roles = {k: tensor_role(k, pre.meta(k), options.key_rule) for k in keys}
    float_keys = [k for k in keys if roles[k] != TensorRole.SKIP]
    quant_keys = [k for k in float_keys if roles[k] == TensorRole.QUANTIZE]
    if not float_keys:
        raise CheckpointError(f"{where(pre.path)}: no floating-point tensors to quantize")

    names = list(readers)
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out))
        avg_tmp = stack.enter_context(atomic_file(Path(average_out))) if average_out is not None else None
        task_files = {name: _safe_file_name(i, name) for i, name in enumerate(names)}
        aux = get_scheme(options.quantizer).aux_names
        task_names = announced_names(float_keys, set(quant_keys), aux)
        writers = {name: PackFileWriter(tmp, task_files[name], task_names, {"task": name}) for name in names}
        base_names = announced_names(quant_keys, set(quant_keys), aux)
        base = PackFileWriter(tmp, "base.safetensors", base_names, {"role": "base"}) if options.residual else None
        avg_writer = StreamingSafetensorsWriter(avg_tmp, keys, {"format": "pt"}) if avg_tmp is not None else None
        all_writers = [*writers.values(), *([base] if base else []), *([avg_writer] if avg_writer else [])]
        stack.callback(lambda: [w.abort() for w in all_writers])  # closes handles; no-op once closed
        stats = stream_encode(pre, readers, keys, roles, options, writers, base, avg_writer, progress=progress)
        for name, digest in (expect_digests or {}).items():
            if stats.digests[name].hexdigest() != digest:
                raise CheckpointError(f"{where(readers[name].path)}: content differs from the expected checkpoint of task {name!r}")
        file_entries = {task_files[name]: w.close() for name, w in writers.items()}
        if base is not None:
            file_entries["base.safetensors"] = base.close()
        if avg_writer is not None:
            avg_writer.close()

        manifest = Manifest(
            created_by=f"tvq {__version__}",
            method=options.method(),
            pretrained=_input_ref(pre.path, stats.digests[PRETRAINED], pre),
            tasks=[stats.task_entry(name, task_files[name], readers[name].path, readers[name], _reference(options)) for name in names],
            base_file="base.safetensors" if base is not None else None,
            skipped=[k for k in keys if roles[k] == TensorRole.SKIP],
            files=file_entries,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    written = sum(f.bytes for f in manifest.files.values()) + (out / MANIFEST_NAME).stat().st_size
    return QuantizeReport(manifest=manifest, bytes_read=stats.bytes_read, bytes_written=written)


PRETRAINED = "__pretrained__"


def _reference(options: QuantizeOptions) -> str | None:
    if not options.residual:
        return None
    return "quantized_base" if options.error_correction else "avg"


@dataclass
class StreamStats:
    """What one streaming pass measured: input content hashes, errors, bytes read."""

    digests: dict[str, _Digest]
    err_sq: dict[str, float]
    ref_sq: dict[str, float]
    bytes_read: int = 0

    def task_entry(self, name: str, file: str, path: str | Path, reader: CheckpointReader, reference: str | None = None) -> TaskEntry:
        err, ref = self.err_sq[name], self.ref_sq[name]
        return TaskEntry(
            name=name,
            file=file,
            source=_input_ref(path, self.digests[name], reader),
            rel_error=(err / ref) ** 0.5 if ref > 0 else 0.0,
            reference=reference,
        )


def stream_encode(
    pre: CheckpointReader,
    readers: dict[str, CheckpointReader],
    keys: list[str],
    roles: dict[str, TensorRole],
    options: QuantizeOptions,
    writers: dict[str, PackFileWriter],
    base: PackFileWriter | None,
    avg_writer: StreamingSafetensorsWriter | None = None,
    stored_base=None,
    progress: bool = True,
) -> StreamStats:
    """The one tensor-by-tensor pass: read, check, hash, encode every task's tensor."""
    stats = StreamStats({n: _Digest() for n in [PRETRAINED, *readers]}, dict.fromkeys(readers, 0.0), dict.fromkeys(readers, 0.0))
    for key in tqdm(keys, desc=f"quantize {options.method().label}", unit="tensor", disable=not progress):
        theta_pre = pre.get(key)
        stats.bytes_read += theta_pre.numel() * theta_pre.element_size()
        if roles[key] == TensorRole.SKIP:
            if avg_writer is not None:
                avg_writer.add(key, theta_pre)
            continue
        _check_finite(theta_pre, pre.path, key)
        stats.digests[PRETRAINED].update(key, theta_pre)
        fts = {}
        for name, reader in readers.items():
            t = reader.get(key)
            _check_finite(t, reader.path, key)
            stats.digests[name].update(key, t)
            stats.bytes_read += t.numel() * t.element_size()
            fts[name] = t
        pre32 = theta_pre.float()
        avg = None
        if base is not None or avg_writer is not None:
            avg = mean_of([t.float() for t in fts.values()])
            if avg_writer is not None:
                avg_writer.add(key, avg.to(theta_pre.dtype))
        beta_hat = stored_base(key) if stored_base is not None else None
        for name, (err, ref) in _encode_tensor(key, roles[key], pre32, fts, avg, options, writers, base, beta_hat).items():
            stats.err_sq[name] += err
            stats.ref_sq[name] += ref
    return stats


def _encode_tensor(
    key: str,
    role: TensorRole,
    pre32: torch.Tensor,
    fts: dict[str, torch.Tensor],
    avg: torch.Tensor | None,
    options: QuantizeOptions,
    writers: dict[str, PackFileWriter],
    base: PackFileWriter | None,
    stored_base: torch.Tensor | None = None,
) -> dict[str, tuple[float, float]]:
    """Store one tensor for every task; returns per task (squared error, squared norm) of τ̂.

    ``stored_base`` is deq(Q(β)) of an existing RTVQ pack that tasks are being added to.
    """
    opts = options.scheme_options()
    bits = options.bits_for(key)
    residual = role == TensorRole.QUANTIZE and options.residual
    if residual and stored_base is not None:
        beta_hat, reference = stored_base, stored_base + pre32
    elif residual:
        assert base is not None and avg is not None
        beta_hat = base.add_quantized(key, avg - pre32, options.bits_for(key, base=True), options.quantizer, **opts)
        reference = (beta_hat + pre32) if options.error_correction else avg
    out = {}
    for name, t in fts.items():
        tau = t.float() - pre32
        writer = writers[name]
        if role == TensorRole.KEEP:
            writer.add_raw(key, t if options.target == "finetuned" else tau)  # FQ keeps θ_t itself
            tau_hat = tau
        elif options.target == "finetuned":
            tau_hat = writer.add_quantized(key, t.float(), bits, options.quantizer, **opts) - pre32
        elif residual:
            tau_hat = beta_hat + writer.add_quantized(key, t.float() - reference, bits, options.quantizer, **opts)
        else:
            tau_hat = writer.add_quantized(key, tau, bits, options.quantizer, **opts)
        out[name] = (float((tau_hat - tau).double().pow(2).sum()), float(tau.double().pow(2).sum()))
    return out


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
    check_output(out, overwrite, [Path(p) for p in finetuned.values()])
    keys = sorted(first.keys())
    with atomic_file(out) as tmp:
        writer = StreamingSafetensorsWriter(tmp, keys, {"format": "pt"})
        try:
            for key in tqdm(keys, desc="average", unit="tensor", disable=not progress):
                t0 = first.get(key)
                if not t0.is_floating_point():
                    writer.add(key, t0)
                    continue
                tensors = [r.get(key) for r in readers]
                for r, t in zip(readers, tensors):
                    _check_finite(t, r.path, key)
                writer.add(key, mean_of([t.float() for t in tensors]).to(t0.dtype))
            writer.close()
        except BaseException:
            writer.abort()
            raise
