"""Per-tensor encoding: the pure, parallelisable unit of work behind every pack.

``encode_key(job)`` reads one tensor of the pretrained and fine-tuned checkpoints, checks
it, hashes it, and returns what every pack file stores for it. It touches no output file,
so executors (local threads, Ray workers) can run keys anywhere and the driver writes the
results in key order: the pack is byte-identical whichever executor made it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from tvq.errors import CheckpointError, where
from tvq.io.content_hash import DEFAULT_ALGORITHM, new_hasher
from tvq.io.readers import CheckpointReader, open_checkpoint
from tvq.io.safetensors_writer import sha256_tensor, tensor_bytes
from tvq.quant.fused import DiffCode, encode_differences, encode_residual, sq_norm
from tvq.errors import EncodeError
from tvq.quant.packing import pack_codes, unpack_codes
from tvq.quant.schemes import decode_problem, decoded_bound, get_scheme
from tvq.quant.selection import TensorRole

FLOAT32_MAX = torch.finfo(torch.float32).max
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
    sha256: str | None = None  # of ``data``, when hashed already (by the worker that made it)

    def decode_problem(self) -> str | None:
        """Why this could decode to NaN/Inf, or None: a const's value, a q tensor's scheme
        parameters (raw tensors are the finite τ or θ_t themselves, checked as inputs)."""
        if self.kind == "const":
            return None if self.value is not None and math.isfinite(self.value) else f"constant value {self.value}"
        if self.kind == "q":
            return decode_problem(str(self.scheme), int(self.bits or 0), self.params, self.aux)
        return None

    def largest(self) -> float:
        """The largest magnitude this decodes to (for q, a bound over every code)."""
        if self.kind == "const":
            return abs(float(self.value or 0.0))
        if self.kind == "raw":
            return float(self.data.abs().max()) if self.data is not None and self.data.numel() else 0.0
        return decoded_bound(str(self.scheme), int(self.bits or 0), self.params, self.aux)

    def decoded(self) -> torch.Tensor:
        """The fp32 values this stands for, flat, as a pack reader decodes them."""
        n = math.prod(self.shape)
        if self.kind == "const":
            return torch.full((n,), float(self.value or 0.0), dtype=torch.float32)
        if self.kind == "raw":
            return self.data.reshape(-1).float()  # type: ignore[union-attr]
        bits = int(self.bits or 0)
        codes = unpack_codes(self.data, bits, n)  # type: ignore[arg-type]
        return get_scheme(str(self.scheme)).decode(codes, bits, self.params, self.aux).reshape(-1)

    def hashed(self) -> StoredTensor:
        """Hash ``data`` now, on this thread: the writer (one driver thread) then only writes."""
        if self.data is not None and self.sha256 is None:
            self.sha256 = sha256_tensor(self.data)
        return self


def encode_quantized(x: torch.Tensor, bits: int, scheme: str = "minmax", **opts) -> tuple[StoredTensor, torch.Tensor]:
    """Quantize fp32 ``x``: the stored form (bit-packed codes) and the fp32 reconstruction."""
    quantizer = get_scheme(scheme, bits)
    enc = quantizer.encode(x, bits, opts)
    shape = list(x.shape)
    if enc.constant is not None:
        return StoredTensor("const", shape, bits=bits, value=enc.constant), torch.full(x.shape, enc.constant, dtype=torch.float32)
    stored = StoredTensor("q", shape, pack_codes(enc.codes, bits), bits, scheme, enc.params, enc.aux)
    return stored, quantizer.decode(enc.codes, bits, enc.params, enc.aux).reshape(x.shape)


def stored_minmax(code: DiffCode, shape: list[int]) -> StoredTensor:
    """The stored form of a fused min-max encoding (the same as ``encode_quantized``'s)."""
    p = code.params
    if code.packed is None:
        return StoredTensor("const", shape, bits=p.bits, value=p.constant)
    return StoredTensor("q", shape, code.packed, p.bits, "minmax", {"scale": p.scale, "zero_point": p.zero_point})


def _fused(job: KeyJob, theta_pre: torch.Tensor) -> bool:
    return job.takes_fused_path() and theta_pre.numel() > 0


def encode_raw(t: torch.Tensor) -> StoredTensor:
    return StoredTensor("raw", list(t.shape), t.contiguous())


def tensor_digest(key: str, t: torch.Tensor, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """One line of an input's content hash: name, dtype, shape and the hash of the bytes."""
    h = new_hasher(algorithm)
    h.update(tensor_bytes(t))
    return f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|{h.hexdigest()}\n"


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
    digest_algorithm: str = DEFAULT_ALGORITHM  # of the inputs' content hashes (tvq.io.content_hash)

    def memory_estimate(self) -> int:
        """Peak bytes of encode_key for this tensor, roughly. The fused min-max path holds the
        inputs as stored, the packed codes and, for RTVQ, β̂ in fp32; the plain path about
        (tasks + 4) fp32 copies."""
        if self.role == TensorRole.SKIP:
            return 0
        meta = resolve(self.pretrained, self.unsafe_pickle).meta(self.key)
        tasks = len(self.finetuned)
        if self.takes_fused_path():
            per_element = (tasks + 1) * meta.dtype.itemsize + tasks + (4 if self.options.residual else 0)
            return meta.numel * per_element
        return meta.numel * (tasks + 4) * 4

    def takes_fused_path(self) -> bool:
        """Task-vector min-max quantization takes the fused, chunked path (same bytes, ~3x faster)."""
        o = self.options
        return self.role == TensorRole.QUANTIZE and o.quantizer == "minmax" and o.target != "finetuned"


@dataclass
class KeyResult:
    key: str
    stored: dict[str, StoredTensor] = field(default_factory=dict)  # task name or BASE -> form
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # task -> (|τ̂-τ|², |τ|²)
    digests: dict[str, str] = field(default_factory=dict)  # input -> digest line
    average: torch.Tensor | None = None  # θ_avg (or the pretrained tensor, for non-float keys)
    bytes_read: int = 0

    @property
    def nbytes(self) -> int:
        """Memory this result holds until it is written (for the executor's budget)."""
        tensors = [self.average] + [t for s in self.stored.values() for t in (s.data, *s.aux.values())]
        return sum(t.nbytes for t in tensors if t is not None)


@lru_cache(maxsize=64)
def _open_cached(path: str, stamp: tuple[int, int], unsafe_pickle: bool) -> CheckpointReader:
    return open_checkpoint(path, unsafe_pickle)


def input_stamp(path: Path) -> tuple[int, int]:
    """Modification time and size: a rewritten file is opened afresh, never served stale."""
    target = path / "model.safetensors.index.json" if path.is_dir() else path
    st = (target if target.exists() else path).stat()
    return st.st_mtime_ns, st.st_size


def resolve(source: object, unsafe_pickle: bool = False) -> CheckpointReader:
    """A reader for a path (opened once per process and file version) or the reader itself."""
    if hasattr(source, "get"):
        return source  # type: ignore[return-value]
    path = Path(str(source))
    return _open_cached(str(path), input_stamp(path), unsafe_pickle)


@lru_cache(maxsize=8)
def _open_pack_cached(path: str, stamp: tuple[int, int]):
    from tvq.pack.reader import open_pack

    return open_pack(path)


def stored_base(pack_path: str, key: str) -> torch.Tensor:
    p = Path(pack_path)
    return _open_pack_cached(str(p), input_stamp(p / "manifest.json")).base_tensor(key)


def check_finite(t: torch.Tensor, path: Path, key: str) -> None:
    """NaN/Inf anywhere makes the fp32 sum non-finite; the sum is 15x cheaper than isfinite().
    A finite tensor whose sum overflows is told apart by the exact check."""
    cheap_ok = not t.is_floating_point() or not t.numel() or bool(torch.isfinite(t.sum(dtype=torch.float32)))
    if not cheap_ok and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{where(path, key)}: contains NaN or Inf")


def beyond_fp32(t: torch.Tensor) -> float | None:
    """The largest magnitude of fp64 ``t`` when it is finite but becomes Inf in fp32, else None.
    Conversion is monotone, so the largest magnitude converts as every element does: one
    reduction, for fp64 only (every other float dtype fits in fp32; NaN/Inf are not this)."""
    if t.dtype != torch.float64 or not t.numel():
        return None
    largest = float(t.abs().max())
    fits = math.isfinite(float(torch.tensor(largest, dtype=torch.float32)))
    return largest if math.isfinite(largest) and not fits else None


def check_fp32_range(t: torch.Tensor, path: Path, key: str) -> None:
    """fp64 values beyond fp32's range would become Inf where the encoders convert them."""
    largest = beyond_fp32(t)
    if largest is not None:
        raise CheckpointError(f"{where(path, key)}: values beyond the float32 range (|x| up to {largest:.3g})")


def check_average(avg: torch.Tensor, inputs: KeyInputs) -> None:
    """θ_avg is a sum then a division in fp32 (the paper's, bit for bit), and the sum of
    finite tensors can overflow: the averaged model must not be written with Inf. An fp32
    sum finds it (exactly: a non-finite sum is checked element by element)."""
    if bool(torch.isfinite(avg.sum(dtype=torch.float32))) or bool(torch.isfinite(avg).all()):
        return
    inputs.check()
    raise CheckpointError(f"{inputs.where_first()}: the average of the fine-tuned checkpoints overflows float32")


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """fp32 mean, summed in order from zero then divided: the paper's get_avg_model_statedict,
    bit for bit (signed zeros included), with one fp32 buffer whatever the input dtype; the
    mean of identical tensors is that tensor. (In fp32 (x+x+x)/3 != x; for a tensor no task
    changed, that rounding noise would cost RTVQ a full base and noisy offsets.)"""
    if all(torch.equal(t, tensors[0]) for t in tensors[1:]):
        return tensors[0].to(torch.float32, copy=True)
    total = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for t in tensors:
        total += t  # mixed-dtype in-place add converts exactly, like t.float()
    return total.div_(len(tensors))


_STAT_CHUNK = 1 << 20


def sq_error(tau: torch.Tensor, *parts: torch.Tensor) -> tuple[float, float]:
    """(|Σ parts − τ|², |τ|²): fp32 dot products per chunk, summed in double. These are
    statistics (the manifest's rel_error), so fp32 chunks are plenty and 15x cheaper than fp64
    (a chunk whose fp32 dot overflows is redone in fp64: finite exactly when the chunk is).
    No parts means τ̂ = τ exactly (kept tensors)."""
    flat = tau.reshape(-1)
    flats = [p.reshape(-1) for p in parts]
    buf = torch.empty(min(_STAT_CHUNK, flat.numel()), dtype=torch.float32) if parts else None
    err = ref = 0.0
    for start in range(0, flat.numel(), _STAT_CHUNK):
        t = flat[start : start + _STAT_CHUNK]
        ref += sq_norm(t)
        if buf is None:
            continue
        d = buf[: t.numel()]
        d.copy_(flats[0][start : start + _STAT_CHUNK])
        for p in flats[1:]:
            d.add_(p[start : start + _STAT_CHUNK])
        d.sub_(t)
        err += sq_norm(d)
    return err, ref


@dataclass
class KeyInputs:
    """One tensor's inputs and their files: what an error message names, and what the exact
    checks of the error path read."""

    key: str
    pre: torch.Tensor
    pre_path: Path
    fts: dict[str, tuple[torch.Tensor, Path]]

    def check(self) -> None:
        """The exact checks, run only once a cheap one failed: a NaN/Inf or fp64-only value in
        an input (θ_pre first, as the files were given), then a task vector θ_t − θ_pre that
        overflows fp32. Raises the first problem found; returns when there is none."""
        for t, path in [(self.pre, self.pre_path), *self.fts.values()]:
            check_finite(t, path, self.key)
            check_fp32_range(t, path, self.key)
        for t, path in self.fts.values():
            if t.is_floating_point() and not bool(torch.isfinite(t.float() - self.pre.float()).all()):
                raise CheckpointError(f"{where(path, self.key)}: task vector overflows float32")

    def where_first(self) -> str:
        path = next(iter(self.fts.values()))[1] if self.fts else self.pre_path
        return where(path, self.key)

    def blame(self, name: str, part: str, problem: str) -> CheckpointError:
        """``problem`` of ``part`` of task ``name`` (or the RTVQ base), once the inputs (and for
        the base, their average) are clean."""
        self.check()
        if name == BASE:
            check_average(mean_of([t for t, _ in self.fts.values()]), self)
        path = self.pre_path if name == BASE else self.fts[name][1]
        return CheckpointError(f"{where(path, self.key)}: cannot quantize the {part}: {problem}")


def check_inputs_finite(err_ref: tuple[float, float], inputs: KeyInputs) -> None:
    """A NaN/Inf in θ_pre or θ_t, or an overflowing τ_t, makes |τ|² (computed anyway, and
    finite for every finite τ) non-finite, so the exact checks run only then: no cost."""
    if not math.isfinite(err_ref[1]):
        inputs.check()


def read_inputs(job: KeyJob, result: KeyResult) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, Path]]]:
    """θ_pre and every θ_t of the job's tensor, in their stored dtype, hashed. fp64 inputs are
    checked to fit fp32 (the other dtypes always do)."""
    pre = resolve(job.pretrained, job.unsafe_pickle)
    theta_pre = pre.get(job.key)
    result.bytes_read += theta_pre.numel() * theta_pre.element_size()
    fts: dict[str, tuple[torch.Tensor, Path]] = {}
    if job.role == TensorRole.SKIP:
        return theta_pre, fts
    check_fp32_range(theta_pre, pre.path, job.key)
    result.digests[PRETRAINED] = tensor_digest(job.key, theta_pre, job.digest_algorithm)
    for name, source in job.finetuned.items():
        reader = resolve(source, job.unsafe_pickle)
        t = reader.get(job.key)
        check_fp32_range(t, reader.path, job.key)
        result.digests[name] = tensor_digest(job.key, t, job.digest_algorithm)
        result.bytes_read += t.numel() * t.element_size()
        fts[name] = (t, reader.path)
    return theta_pre, fts


def encode_key(job: KeyJob) -> KeyResult:
    """Read, check, hash and encode one tensor for every task (and the RTVQ base).

    Inputs stay in their stored dtype (bf16 is half of fp32) and are converted where used;
    full-size fp32 temporaries are dropped as soon as they are spent, so a job peaks at
    about (tasks/2 + 6) x the tensor's fp32 size. Whatever is stored is checked to decode
    to finite values; every problem is a CheckpointError naming the file and the tensor."""
    result = KeyResult(job.key)
    theta_pre, fts = read_inputs(job, result)
    if job.role == TensorRole.SKIP:
        if job.with_average:
            result.average = theta_pre
        return result
    inputs = KeyInputs(job.key, theta_pre, resolve(job.pretrained, job.unsafe_pickle).path, fts)
    try:
        _encode(job, result, inputs)
    except EncodeError as exc:
        name = BASE if exc.base else list(fts)[exc.task or 0]
        raise inputs.blame(name, _part(job, name), exc.problem) from None
    _check_stored(job, result, inputs)
    return _hashed(result)


def _part(job: KeyJob, name: str) -> str:
    """What is quantized for ``name``, in words."""
    if name == BASE:
        return "RTVQ base"
    if job.options.target == "finetuned":
        return "fine-tuned weights"
    return "RTVQ offset" if job.role == TensorRole.QUANTIZE and job.options.residual else "task vector"


def _encode(job: KeyJob, result: KeyResult, inputs: KeyInputs) -> None:
    """encode_key's work: the fused path for min-max task vectors, else the plain one."""
    key, options, theta_pre, fts = job.key, job.options, inputs.pre, inputs.fts
    residual = job.role == TensorRole.QUANTIZE and options.residual
    fused = _fused(job, theta_pre)
    if fused and residual and job.base_pack is None and not job.with_average:
        base, codes = encode_residual([t for t, _ in fts.values()], theta_pre, options.bits_for(key),
                                      options.bits_for(key, base=True), options.error_correction)  # fmt: skip
        result.stored[BASE] = stored_minmax(base, list(theta_pre.shape))
        _store_codes(result, codes, inputs)
        return
    pre32 = theta_pre.float() if residual or not fused else theta_pre  # the fused TVQ path converts per chunk
    avg = None
    if job.with_average or (residual and job.base_pack is None):
        avg = mean_of([t for t, _ in fts.values()])
        if job.with_average:
            result.average = avg.to(theta_pre.dtype)
            check_average(result.average, inputs)
    scheme, opts, bits = options.quantizer, options.scheme_options(), options.bits_for(key)
    if residual and job.base_pack is not None:
        beta_hat = stored_base(job.base_pack, key)
        reference = beta_hat + pre32
    elif residual:
        spent = options.error_correction and not job.with_average  # θ_avg no longer needed (result.average may alias it)
        beta = avg.sub_(pre32) if spent else avg - pre32
        try:
            result.stored[BASE], beta_hat = encode_quantized(beta, options.bits_for(key, base=True), scheme, **opts)
        except EncodeError as exc:
            raise exc.at(base=True) from None
        del beta
        reference = (beta_hat + pre32) if options.error_correction else avg
    avg = None
    if fused:
        subtrahend = reference if residual else theta_pre
        codes = encode_differences([t for t, _ in fts.values()], subtrahend, bits,
                                   pretrained=theta_pre if residual else None, base_hat=beta_hat if residual else None)  # fmt: skip
        _store_codes(result, codes, inputs)
        return
    for i, (name, (t, path)) in enumerate(fts.items()):
        try:
            if job.role == TensorRole.KEEP:
                tau = t - pre32  # bf16 - fp32 promotes exactly: t.float() - pre32, one pass
                result.stored[name] = encode_raw(t if options.target == "finetuned" else tau)  # FQ keeps θ_t
                parts: tuple[torch.Tensor, ...] = ()
            elif options.target == "finetuned":
                result.stored[name], recon = encode_quantized(t.float(), bits, scheme, **opts)
                tau, parts = t - pre32, (recon.sub_(pre32),)
            elif residual:
                result.stored[name], offset_hat = encode_quantized(t - reference, bits, scheme, **opts)
                tau, parts = t - pre32, (beta_hat, offset_hat)
            else:
                tau = t - pre32
                result.stored[name], tau_hat = encode_quantized(tau, bits, scheme, **opts)
                parts = (tau_hat,)
        except EncodeError as exc:
            raise exc.at(task=i) from None
        result.errors[name] = sq_error(tau, *parts)
        check_inputs_finite(result.errors[name], inputs)
        if beyond_fp32(tau) is not None:  # fp64 inputs: τ itself is fp64 (stored raw when kept)
            raise CheckpointError(f"{where(path, key)}: task vector overflows float32")
        del tau, parts


def _store_codes(result: KeyResult, codes: list[DiffCode], inputs: KeyInputs) -> None:
    """Each task's fused encoding into the result, its inputs checked for NaN/Inf."""
    for name, code in zip(inputs.fts, codes, strict=True):
        result.stored[name] = stored_minmax(code, list(inputs.pre.shape))
        result.errors[name] = (code.sq_err, code.sq_ref)
        check_inputs_finite(result.errors[name], inputs)


def _check_stored(job: KeyJob, result: KeyResult, inputs: KeyInputs) -> None:
    """Nothing written may decode to NaN/Inf: every stored form's parameters (a few scalars
    each), every reconstruction error (computed anyway; non-finite when τ̂ − τ overflows),
    and RTVQ's τ̂ = β̂ + ô, summed for real only when the bounds over every code (|β̂| + |ô|)
    do not already keep it below fp32's largest value."""
    for name, stored in result.stored.items():
        problem = stored.decode_problem()
        if problem is not None:
            raise inputs.blame(name, _part(job, name), problem)
    base = result.stored.get(BASE)
    base_largest = base.largest() if base is not None else 0.0
    for name, stored in result.stored.items():
        if base is None or name == BASE or base_largest + stored.largest() < FLOAT32_MAX:
            continue
        if not bool(torch.isfinite(base.decoded() + stored.decoded()).all()):
            raise inputs.blame(name, _part(job, name), "its reconstruction (RTVQ base + offset) overflows float32")
    for name, (err, _) in result.errors.items():
        if not math.isfinite(err):
            raise inputs.blame(name, _part(job, name), "its reconstruction overflows float32")


def _hashed(result: KeyResult) -> KeyResult:
    """Outputs hashed on the worker: the driver, which writes them in order, only writes."""
    for stored in result.stored.values():
        stored.hashed()
    return result
