"""Validating a manifest once, completely, when it is read.

A pack may come from a stranger, and its manifest's digest only proves the manifest is
whole, not that its author meant well (anyone can recompute it). So every field that
decides what tvq opens, allocates or computes is checked here, before anything else runs:
file names are confined to the pack, cross-references exist, shapes agree across files,
byte counts match the bits and the scheme, element counts are capped, and every decoding
parameter keeps every reconstruction finite. After this, readers can trust the manifest's
arithmetic; what they still check per read is the data itself (sha256 per tensor).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from tvq.errors import PackError, where
from tvq.io.dtypes import TORCH_DTYPES
from tvq.io.paths import PACK_FILE_NAME, name_problem
from tvq.pack.manifest import (
    ConstEntry,
    EntropyEntry,
    FileEntry,
    Manifest,
    QuantizedEntry,
    RawEntry,
    TensorEntry,
)
from tvq.quant.bits import MAX_BITS, MIN_BITS
from tvq.quant.entropy import BITSHUFFLE, MAX_BLOCK, MIN_BLOCK, aligned_nbytes
from tvq.quant.packing import packed_nbytes
from tvq.quant.schemes import FLOAT32_MAX, SCHEMES, decode_problem

# Caps on what a manifest may ask for before anything is allocated. 2^32 elements (16 GiB
# in fp32) is above the largest tensor of today's open models (a 128k x 16k vocabulary
# matrix is 2.1e9); larger needs TVQ_MAX_TENSOR_ELEMENTS in the environment.
MAX_TENSOR_ELEMENTS = 1 << 32
MAX_NDIM = 8
MAX_GROUP_SIZE = 1 << 24
MAX_TASKS = 10_000
MAX_NAME = 1024  # task and tensor names
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def max_tensor_elements() -> int:
    value = os.environ.get("TVQ_MAX_TENSOR_ELEMENTS")
    return int(value) if value and value.isdigit() else MAX_TENSOR_ELEMENTS


class _Checker:
    def __init__(self, file: Path, version: int) -> None:
        self.file = file
        self.version = version
        self.cap = max_tensor_elements()
        self.names_seen: set[str] = set()

    def fail(self, what: str, problem: str) -> PackError:
        return PackError(f"{where(self.file)}: invalid manifest: {what}: {problem}")

    def name(self, value: str, what: str) -> None:
        if value in self.names_seen:  # the same tensor names recur in every task file
            return
        if not value or len(value) > MAX_NAME or _CONTROL.search(value):
            raise self.fail(what, f"bad name {value[:80]!r} (1-{MAX_NAME} printable characters)")
        self.names_seen.add(value)

    def file_name(self, value: str, what: str) -> None:
        problem = name_problem(value, PACK_FILE_NAME)
        if problem:
            raise self.fail(what, problem)

    def tensor(self, entry: TensorEntry, what: str) -> None:
        if len(entry.shape) > MAX_NDIM or any(d < 0 for d in entry.shape):
            raise self.fail(what, f"shape {entry.shape[:MAX_NDIM + 1]} (at most {MAX_NDIM} non-negative dimensions)")
        if entry.numel > self.cap:
            raise self.fail(what, f"{entry.numel} elements, more than the cap of {self.cap} (TVQ_MAX_TENSOR_ELEMENTS)")
        if isinstance(entry, ConstEntry):  # the schema: no data, no checksum, float32
            self._const(entry, what)
            return
        if not _HEX64.match(entry.sha256):
            raise self.fail(what, "sha256 is not 64 hex digits")
        if isinstance(entry, RawEntry):
            self._raw(entry, what)
        else:
            self._q(entry, what)

    def _const(self, e: ConstEntry, what: str) -> None:
        if not math.isfinite(e.value) or abs(e.value) > FLOAT32_MAX:
            raise self.fail(what, f"constant needs a finite float32 value, got {e.value!r}")
        if e.bits is not None and not MIN_BITS <= e.bits <= MAX_BITS:
            raise self.fail(what, f"bits {e.bits} out of range {MIN_BITS}-{MAX_BITS}")

    def _raw(self, e: RawEntry, what: str) -> None:
        dtype = TORCH_DTYPES.get(e.dtype)
        if dtype is None:
            raise self.fail(what, f"unknown dtype {e.dtype!r}")
        plain = e.numel * dtype.itemsize
        if e.entropy is not None:
            self._coded_raw(e, e.entropy, plain, dtype.itemsize, what)
        elif e.nbytes != plain:
            raise self.fail(what, f"nbytes {e.nbytes} for {e.numel} elements of {e.dtype} (expected {plain})")

    def _coded_raw(self, e: RawEntry, coding: EntropyEntry, plain: int, itemsize: int, what: str) -> None:
        """An entropy-coded raw tensor (tvq.quant.entropy.encode_raw_bytes): version 4, bit-shuffled
        blocks of whole elements tiling the tensor's bytes, fewer stored bytes than plain."""
        what = f"{what}: entropy"
        if self.version < 4:
            raise self.fail(what, f"entropy-coded raw tensors need pack format version 4, the manifest says {self.version}")
        if coding.filter != BITSHUFFLE:
            raise self.fail(what, f"a raw tensor is coded with filter {BITSHUFFLE!r}, got {coding.filter!r}")
        self._blocks(e.nbytes, coding, plain, what)
        if coding.block % itemsize:  # a power of two from 2^12 holds whole elements of every dtype today
            raise self.fail(what, f"block {coding.block} is not a whole number of {itemsize}-byte elements")

    def _q(self, e: QuantizedEntry, what: str) -> None:
        scheme = SCHEMES.get(e.scheme)
        if scheme is None:
            raise self.fail(what, f"unknown quantizer {e.scheme!r}")
        if e.bits not in scheme.bits:
            raise self.fail(what, f"bits {e.bits} not valid for {e.scheme} (valid: {', '.join(map(str, scheme.bits))})")
        if set(e.params) != scheme.param_names:
            raise self.fail(what, f"{e.scheme} needs parameters {sorted(scheme.param_names)}, got {sorted(e.params)}")
        size = e.params.get("group_size")
        if size is not None and (size != int(size) or not 1 <= size <= MAX_GROUP_SIZE):
            raise self.fail(what, f"group_size {size!r} must be an integer from 1 to {MAX_GROUP_SIZE}")
        if not scheme.aux_names:  # group ranges live in the aux arrays: checked when they are read
            problem = decode_problem(scheme.name, e.bits, e.params, {})
            if problem:
                raise self.fail(what, problem)
        if e.entropy is not None:
            self._entropy(e, e.entropy, what)
        elif e.nbytes != packed_nbytes(e.numel, e.bits):
            raise self.fail(what, f"nbytes {e.nbytes} for {e.numel} codes of {e.bits} bits (expected {packed_nbytes(e.numel, e.bits)})")
        if set(e.aux) != set(scheme.aux_names):
            raise self.fail(what, f"{e.scheme} stores aux arrays {list(scheme.aux_names)}, got {sorted(e.aux)}")
        for name, aux in e.aux.items():
            expected = e.aux_numel * 4
            if aux.nbytes != expected or not _HEX64.match(aux.sha256):
                raise self.fail(f"{what}::{name}", f"nbytes {aux.nbytes} (expected {expected} float32 bytes) and a 64-hex sha256")

    def _entropy(self, e: QuantizedEntry, coding: EntropyEntry, what: str) -> None:
        """Entropy-coded codes (tvq.quant.entropy): the blocks tile the stored bytes and the
        decoded stream, and the stored bytes are fewer than plain packing's (a tensor is coded
        only where that pays), so what a read allocates is bounded by the shape."""
        what = f"{what}: entropy"
        if self.version < 3:
            raise self.fail(what, f"entropy-coded codes need pack format version 3, the manifest says {self.version}")
        if coding.filter is not None:
            raise self.fail(what, f"codes are coded byte-aligned, without a filter (got {coding.filter!r})")
        self._blocks(e.nbytes, coding, aligned_nbytes(e.numel, e.bits), what, packed_nbytes(e.numel, e.bits))

    def _blocks(self, nbytes: int, coding: EntropyEntry, decoded: int, what: str, plain: int | None = None) -> None:
        """Frames of ``block`` decoded bytes tiling ``decoded`` bytes and the ``nbytes`` stored
        ones, fewer than ``plain`` (the uncoded size; ``decoded`` when not given)."""
        plain = decoded if plain is None else plain
        if not 0 < nbytes < plain:
            raise self.fail(what, f"nbytes {nbytes}: coded data takes 1 to {plain - 1} bytes (fewer than the {plain} uncoded)")
        block = coding.block
        if not MIN_BLOCK <= block <= MAX_BLOCK or block & (block - 1):
            raise self.fail(what, f"block {block} must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}")
        expected = -(-decoded // block)
        if len(coding.blocks) != expected:
            raise self.fail(what, f"{len(coding.blocks)} blocks for {decoded} decoded bytes in blocks of {block} (expected {expected})")
        if any(size < 1 for size in coding.blocks) or sum(coding.blocks) != nbytes:
            raise self.fail(what, f"block sizes must be positive and sum to nbytes {nbytes}, got {sum(coding.blocks)}")

    def file_entry(self, rel: str, entry: FileEntry) -> None:
        self.file_name(rel, f"files.{rel[:80]!r}")
        if entry.bytes < 0 or not _HEX64.match(entry.sha256):
            raise self.fail(f"files.{rel!r}", "bytes must be >= 0 and sha256 64 hex digits")
        stored = 0
        for key, tensor in entry.tensors.items():
            what = f"{rel}: tensor {key[:120]!r}"
            self.name(key, what)
            self.tensor(tensor, what)
            stored += tensor.stored_bytes
        if stored > entry.bytes:
            raise self.fail(f"files.{rel!r}", f"its tensors claim {stored} bytes, the file has {entry.bytes}")


def validate_manifest(manifest: Manifest, file: Path) -> None:
    """Raise one PackError naming ``file``, the field and the problem, or return."""
    c = _Checker(file, manifest.version)
    m = manifest.method
    if not MIN_BITS <= m.bits <= MAX_BITS:
        raise c.fail("method.bits", f"{m.bits} out of range {MIN_BITS}-{MAX_BITS}")
    if m.residual != (m.base_bits is not None) or (m.base_bits is not None and not MIN_BITS <= m.base_bits <= MAX_BITS):
        raise c.fail("method.base_bits", f"{m.base_bits!r}: an RTVQ pack needs base bits {MIN_BITS}-{MAX_BITS}, others none")
    if m.residual and m.target != "task_vector":
        raise c.fail("method", "residual packs quantize task vectors")
    if m.error_correction and not m.residual:
        raise c.fail("method.error_correction", "only RTVQ packs use error correction")
    if m.quantizer not in SCHEMES:
        raise c.fail("method.quantizer", f"unknown quantizer {m.quantizer!r}")
    if m.group_size is not None and not 1 <= m.group_size <= MAX_GROUP_SIZE:
        raise c.fail("method.group_size", f"{m.group_size} out of range 1-{MAX_GROUP_SIZE}")
    if m.budget_bits is not None and not (math.isfinite(m.budget_bits) and m.budget_bits > 0):
        raise c.fail("method.budget_bits", f"{m.budget_bits!r} must be a positive finite number")
    for ref, what in [(manifest.pretrained, "pretrained"), *((t.source, f"tasks[{i}].source") for i, t in enumerate(manifest.tasks))]:
        if ref.fp32_bytes < 0 or len(ref.path) > 4096:
            raise c.fail(what, "fp32_bytes must be >= 0 and the path at most 4096 characters")

    if not manifest.tasks:
        raise c.fail("tasks", "a pack holds at least one task")
    if len(manifest.tasks) > MAX_TASKS:
        raise c.fail("tasks", f"{len(manifest.tasks)} tasks (at most {MAX_TASKS})")
    names: set[str] = set()
    task_files: set[str] = set()
    for i, task in enumerate(manifest.tasks):
        what = f"tasks[{i}]"
        c.name(task.name, f"{what}.name")
        if task.name in names:
            raise c.fail(f"{what}.name", f"task {task.name!r} appears twice")
        names.add(task.name)
        if task.file not in manifest.files:
            raise c.fail(f"{what}.file", f"{task.file[:80]!r} is not listed in files")
        if task.file in task_files:
            raise c.fail(f"{what}.file", f"{task.file!r} belongs to two tasks")
        task_files.add(task.file)
        for field, value in (("rel_error", task.rel_error), ("rel_error_quantized", task.rel_error_quantized)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise c.fail(f"{what}.{field}", f"{value!r} must be a non-negative finite number")
        if task.reference is not None and not m.residual:
            raise c.fail(f"{what}.reference", "only RTVQ tasks have a reference")
    if m.residual != (manifest.base_file is not None):
        raise c.fail("base_file", "an RTVQ pack has a base file; other packs none")
    if manifest.base_file is not None:
        if manifest.base_file not in manifest.files:
            raise c.fail("base_file", f"{manifest.base_file[:80]!r} is not listed in files")
        if manifest.base_file in task_files:
            raise c.fail("base_file", "the base file is also a task's file")
    referenced = task_files | ({manifest.base_file} if manifest.base_file else set())
    for rel, entry in manifest.files.items():
        if rel not in referenced:
            c.file_name(rel, "files")
            raise c.fail(f"files.{rel!r}", "not a task's file nor the base file")
        c.file_entry(rel, entry)
    for key in manifest.skipped:
        c.name(key, "skipped")

    _check_tensor_sets(c, manifest)


def kept_zero(entry: TensorEntry, manifest: Manifest) -> bool:
    """A kept tensor's zero task vector as the paper's key rule stores it (``tvq.encode.key``):
    the constant 0, without a width, in a task-vector pack with ``key_rule: paper``."""
    m = manifest.method
    return (
        isinstance(entry, ConstEntry)
        and entry.bits is None
        and entry.value == 0.0
        and m.key_rule == "paper"
        and m.target == "task_vector"
    )


def kept_keys(manifest: Manifest) -> set[str]:
    """The tensors a pack keeps exactly: stored ``raw`` in some task, or the constant 0 of a
    kept tensor (``kept_zero``) in every task."""
    files = [manifest.files[t.file].tensors for t in manifest.tasks]
    return {
        key
        for key in files[0]
        if any(f[key].kind == "raw" for f in files) or all(kept_zero(f[key], manifest) for f in files)
    }


def _check_tensor_sets(c: _Checker, manifest: Manifest) -> None:
    """Every task file holds the same tensors with the same shapes; the base only
    quantized ones of those; FQ stores no constants of a task vector. A tensor is kept
    (``raw``) in every task or in none, except that a kept tensor may be the constant 0 in
    the tasks whose task vector is zero (``kept_zero``)."""
    first_rel = manifest.tasks[0].file
    first = manifest.files[first_rel].tensors
    if not first:
        raise c.fail(f"files.{first_rel!r}", "holds no tensors")
    shapes = {k: e.shape for k, e in first.items()}
    for task in manifest.tasks[1:]:
        tensors = manifest.files[task.file].tensors
        if tensors.keys() != shapes.keys():
            odd = sorted(set(tensors) ^ set(shapes))[0]
            raise c.fail(f"{task.file}: tensor {odd!r}", f"present in one task file and not in {first_rel}")
        for key, e in tensors.items():
            if e.shape != shapes[key]:
                raise c.fail(f"{task.file}: tensor {key!r}", f"shape {e.shape} differs from {shapes[key]} in {first_rel}")
    for key in shapes:
        entries = [(task.file, manifest.files[task.file].tensors[key]) for task in manifest.tasks]
        raw = next((rel for rel, e in entries if e.kind == "raw"), None)
        if raw is None:
            continue
        for rel, e in entries:
            if e.kind != "raw" and not kept_zero(e, manifest):
                raise c.fail(f"{rel}: tensor {key!r}", f"stored {e.kind} here and raw in {raw} (only a kept tensor's zero may differ)")
    if manifest.base_file is None:
        return
    for key, e in manifest.files[manifest.base_file].tensors.items():
        what = f"{manifest.base_file}: tensor {key!r}"
        if key not in shapes:
            raise c.fail(what, "the base holds a tensor no task has")
        if e.shape != shapes[key]:
            raise c.fail(what, f"shape {e.shape} differs from {shapes[key]} in {first_rel}")
        if e.kind == "raw":
            raise c.fail(what, "the base stores quantized tensors only")
