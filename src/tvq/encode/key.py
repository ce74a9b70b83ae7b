"""``encode_key``: read, check, hash and encode one tensor of every task (and the RTVQ base).

The pure, parallelisable unit of work behind every pack: it touches no output file, so
executors (local threads, Ray workers) run keys anywhere. It reads the inputs, picks the
method's encoder (tvq.encode.tvq, .rtvq, .fq; kept tensors are stored exactly) and checks
that whatever is stored decodes to finite values; every problem is a CheckpointError
naming the file and the tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tvq.device import DEVICE_CHUNK, on_host
from tvq.encode.checks import KeyInputs, check_average, check_fp32_range, check_stored
from tvq.encode.fq import encode_fq
from tvq.encode.job import BASE, PRETRAINED, KeyCodes, KeyJob, KeyResult, resolve, tensor_digest
from tvq.encode.rtvq import encode_rtvq
from tvq.encode.tvq import encode_tvq
from tvq.errors import EncodeError
from tvq.quant.chunks import mean_of, sq_error
from tvq.quant.selection import KeyRule, TensorRole
from tvq.quant.stored import StoredTensor, encode_raw


def encode_key(job: KeyJob) -> KeyResult:
    """Inputs stay in their stored dtype (bf16 is half of fp32) and are converted where used."""
    result = KeyResult(job.key)
    inputs = read_inputs(job, result)
    if job.role == TensorRole.SKIP:
        if job.with_average:
            result.average = inputs.pre
        return result
    average = None
    if job.with_average:
        average = mean_of(inputs.thetas)
        result.average = average.to(inputs.pre.dtype)
        check_average(result.average, inputs)
    try:
        codes = encode(job, inputs, average)
    except EncodeError as exc:
        name = BASE if exc.base else list(inputs.fts)[exc.task or 0]
        raise inputs.blame(name, part(job, name), exc.problem) from None
    for name in inputs.fts:
        inputs.check_task(name, codes.errors[name], exact_fp64=not job.streams)
    check_stored(codes.stored, codes.errors, inputs, {name: part(job, name) for name in codes.stored})
    for stored in codes.stored.values():
        if job.options.entropy != "off":  # where it pays; after the checks, which read the plain codes
            stored.entropy_coded(strong=job.options.entropy == "max")
        stored.hashed()  # on the worker: the driver, which writes them in order, only writes
    result.stored, result.errors = codes.stored, codes.errors
    return result


def encode(job: KeyJob, inputs: KeyInputs, average: torch.Tensor | None) -> KeyCodes:
    """The method's encoder for this tensor."""
    options = job.options
    if job.role.exact:  # kept tensors and running statistics
        # The paper's rule keeps e.g. CLIP's token embedding raw; unchanged by every task, it is
        # a constant 0, as the default rule stores it (not 101 MB per task of zeros).
        zero_constant = job.role == TensorRole.KEEP and options.key_rule == KeyRule.PAPER and options.target == "task_vector"
        return encode_kept(inputs, keep_finetuned=options.target == "finetuned", zero_constant=zero_constant)
    q = options.quantizer_for(job.key)
    if options.target == "finetuned":
        return encode_fq(inputs, q)
    chunk = None
    if not on_host(device := torch.device(job.device)) and job.streams:  # elementwise math only: the same codes there
        inputs, chunk = inputs.on(device), DEVICE_CHUNK
        average = None if average is None else average.to(device)
    if options.residual:
        return encode_rtvq(inputs, q, options.quantizer_for(job.key, base=True), options.error_correction, job.streams,
                           average=average, base_pack=job.base_pack, chunk=chunk)  # fmt: skip
    return encode_tvq(inputs, q, job.streams, chunk)


def encode_kept(inputs: KeyInputs, keep_finetuned: bool, zero_constant: bool = False) -> KeyCodes:
    """Tensors kept exactly: τ_t (θ_t itself for FQ) as stored, so τ̂_t = τ_t. With
    ``zero_constant``, a tensor whose τ_t is 0 in every task is stored as the constant 0."""
    pre32 = inputs.pre.float()
    out = KeyCodes()
    zero = zero_constant and all(bool((t == pre32).all()) for t in inputs.thetas)  # τ_t = 0 exactly (inputs are finite)
    for name, t in zip(inputs.fts, inputs.thetas, strict=True):
        tau = t - pre32  # bf16 - fp32 promotes exactly: t.float() - pre32, one pass
        out.stored[name] = StoredTensor("const", list(tau.shape), value=0.0) if zero else encode_raw(t if keep_finetuned else tau)
        out.errors[name] = sq_error(tau)
    return out


def part(job: KeyJob, name: str) -> str:
    """What is quantized for ``name``, in words."""
    if name == BASE:
        return "RTVQ base"
    if job.options.target == "finetuned":
        return "fine-tuned weights"
    return "RTVQ offset" if job.role == TensorRole.QUANTIZE and job.options.residual else "task vector"


def read_inputs(job: KeyJob, result: KeyResult) -> KeyInputs:
    """θ_pre and every θ_t of the job's tensor, in their stored dtype, hashed. fp64 inputs are
    checked to fit fp32 (the other dtypes always do)."""
    pre = resolve(job.pretrained, job.unsafe_pickle)
    theta_pre = pre.get(job.key)
    inputs = KeyInputs(job.key, theta_pre, Path(pre.path), {})
    if job.first_group:  # a tensor split by tasks (tvq.encode.job.task_groups) hashes and counts θ_pre once
        result.bytes_read += theta_pre.numel() * theta_pre.element_size()
    if job.role == TensorRole.SKIP:
        return inputs
    check_fp32_range(theta_pre, pre.path, job.key)
    if job.first_group:
        result.digests[PRETRAINED] = tensor_digest(job.key, theta_pre, job.digest_algorithm)
    for name, source in job.finetuned.items():
        reader = resolve(source, job.unsafe_pickle)
        t = reader.get(job.key)
        check_fp32_range(t, reader.path, job.key)
        result.digests[name] = tensor_digest(job.key, t, job.digest_algorithm)
        result.bytes_read += t.numel() * t.element_size()
        inputs.fts[name] = (t, reader.path)
    return inputs
