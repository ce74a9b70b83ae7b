"""Per-tensor encoding: the pure, parallelisable unit of work behind every pack.

``encode_key(job)`` reads one tensor of the pretrained and fine-tuned checkpoints, checks
it, hashes it, and returns what every pack file stores for it. It touches no output file,
so executors (local threads, Ray workers) can run keys anywhere and the driver writes the
results in key order: the pack is byte-identical whichever executor made it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from tvq.errors import CheckpointError, where
from tvq.io.readers import CheckpointReader, open_checkpoint
from tvq.io.safetensors_writer import tensor_bytes
from tvq.quant.packing import pack_codes
from tvq.quant.schemes import get_scheme
from tvq.quant.selection import TensorRole

BASE = "__base__"  # file id of the RTVQ base in job results
PRETRAINED = "__pretrained__"


@dataclass
class StoredTensor:
    """What a pack file holds for one tensor, before it is written."""

    kind: str  # "q", "raw" or "const"
    shape: list[int]
    data: torch.Tensor | None = None  # packed codes (q) or the tensor itself (raw)
    bits: int | None = None
    scheme: str | None = None
    params: dict[str, float] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    value: float | None = None  # const


def encode_quantized(x: torch.Tensor, bits: int, scheme: str = "minmax", **opts) -> tuple[StoredTensor, torch.Tensor]:
    """Quantize fp32 ``x``: the stored form (bit-packed codes) and the fp32 reconstruction."""
    quantizer = get_scheme(scheme, bits)
    enc = quantizer.encode(x, bits, opts)
    shape = list(x.shape)
    if enc.constant is not None:
        return StoredTensor("const", shape, bits=bits, value=enc.constant), torch.full(x.shape, enc.constant, dtype=torch.float32)
    stored = StoredTensor("q", shape, pack_codes(enc.codes, bits), bits, scheme, enc.params, enc.aux)
    return stored, quantizer.decode(enc.codes, bits, enc.params, enc.aux).reshape(x.shape)


def encode_raw(t: torch.Tensor) -> StoredTensor:
    return StoredTensor("raw", list(t.shape), t.contiguous())


def tensor_digest(key: str, t: torch.Tensor) -> str:
    """One line of an input's content hash: name, dtype, shape and the sha256 of the bytes."""
    return f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|{hashlib.sha256(tensor_bytes(t)).hexdigest()}\n"


@dataclass
class KeyJob:
    """Everything needed to encode one tensor; paths (not open files) travel to workers."""

    key: str
    role: TensorRole
    pretrained: object  # path or open reader
    finetuned: dict[str, object]
    options: object  # tvq.compress.QuantizeOptions
    with_average: bool = False
    base_pack: str | None = None  # adding tasks to this RTVQ pack: reuse its stored deq(Q(β))
    unsafe_pickle: bool = False


@dataclass
class KeyResult:
    key: str
    stored: dict[str, StoredTensor] = field(default_factory=dict)  # task name or BASE -> form
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # task -> (|τ̂-τ|², |τ|²)
    digests: dict[str, str] = field(default_factory=dict)  # input -> digest line
    average: torch.Tensor | None = None  # θ_avg (or the pretrained tensor, for non-float keys)
    bytes_read: int = 0


@lru_cache(maxsize=64)
def _open_cached(path: str, stamp: tuple[int, int], unsafe_pickle: bool) -> CheckpointReader:
    return open_checkpoint(path, unsafe_pickle)


def _stamp(path: Path) -> tuple[int, int]:
    """Modification time and size: a rewritten file is opened afresh, never served stale."""
    target = path / "model.safetensors.index.json" if path.is_dir() else path
    st = (target if target.exists() else path).stat()
    return st.st_mtime_ns, st.st_size


def resolve(source: object, unsafe_pickle: bool = False) -> CheckpointReader:
    """A reader for a path (opened once per process and file version) or the reader itself."""
    if hasattr(source, "get"):
        return source  # type: ignore[return-value]
    path = Path(str(source))
    return _open_cached(str(path), _stamp(path), unsafe_pickle)


@lru_cache(maxsize=8)
def _open_pack_cached(path: str, stamp: tuple[int, int]):
    from tvq.pack.reader import open_pack

    return open_pack(path)


def stored_base(pack_path: str, key: str) -> torch.Tensor:
    p = Path(pack_path)
    return _open_pack_cached(str(p), _stamp(p / "manifest.json")).base_tensor(key)


def check_finite(t: torch.Tensor, path: Path, key: str) -> None:
    """NaN/Inf anywhere makes the fp32 sum non-finite; the sum is 15x cheaper than isfinite().
    A finite tensor whose sum overflows is told apart by the exact check."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float32))):
        if not bool(torch.isfinite(t).all()):
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


def encode_key(job: KeyJob) -> KeyResult:
    """Read, check, hash and encode one tensor for every task (and the RTVQ base)."""
    pre = resolve(job.pretrained, job.unsafe_pickle)
    key, options = job.key, job.options
    result = KeyResult(key)
    theta_pre = pre.get(key)
    result.bytes_read += theta_pre.numel() * theta_pre.element_size()
    if job.role == TensorRole.SKIP:
        if job.with_average:
            result.average = theta_pre
        return result
    check_finite(theta_pre, pre.path, key)
    result.digests[PRETRAINED] = tensor_digest(key, theta_pre)
    fts = {}
    for name, source in job.finetuned.items():
        reader = resolve(source, job.unsafe_pickle)
        t = reader.get(key)
        check_finite(t, reader.path, key)
        result.digests[name] = tensor_digest(key, t)
        result.bytes_read += t.numel() * t.element_size()
        fts[name] = t
    pre32 = theta_pre.float()
    residual = job.role == TensorRole.QUANTIZE and options.residual
    avg = None
    if job.with_average or (residual and job.base_pack is None):
        avg = mean_of([t.float() for t in fts.values()])
        if job.with_average:
            result.average = avg.to(theta_pre.dtype)
    scheme, opts, bits = options.quantizer, options.scheme_options(), options.bits_for(key)
    if residual and job.base_pack is not None:
        beta_hat = stored_base(job.base_pack, key)
        reference = beta_hat + pre32
    elif residual:
        result.stored[BASE], beta_hat = encode_quantized(avg - pre32, options.bits_for(key, base=True), scheme, **opts)
        reference = (beta_hat + pre32) if options.error_correction else avg
    for name, t in fts.items():
        tau = t.float() - pre32
        if job.role == TensorRole.KEEP:
            result.stored[name] = encode_raw(t if options.target == "finetuned" else tau)  # FQ keeps θ_t
            tau_hat = tau
        elif options.target == "finetuned":
            result.stored[name], recon = encode_quantized(t.float(), bits, scheme, **opts)
            tau_hat = recon - pre32
        elif residual:
            result.stored[name], offset_hat = encode_quantized(t.float() - reference, bits, scheme, **opts)
            tau_hat = beta_hat + offset_hat
        else:
            result.stored[name], tau_hat = encode_quantized(tau, bits, scheme, **opts)
        result.errors[name] = (float((tau_hat - tau).double().pow(2).sum()), float(tau.double().pow(2).sum()))
    return result
