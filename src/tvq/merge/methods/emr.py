"""EMR-Merging (Huang et al. 2024): one unified vector, plus a 1-bit mask and a scalar per task.

Reference (harveyhuang18/EMR_Merging, as used in AIM-SKKU/TVQ ``main_emr_merging.py``):
  elected sign  ε = +1 where mean_t τ_t > 0, else −1 (an exact 0 mean gives −1);
  unified       τ_uni = ε ⊙ max_t |τ_t ⊙ m_t|,   with masks m_t = [τ_t ⊙ ε > 0];
  rescalers     λ_t = Σ_keys mean|τ_t| / Σ_keys mean|m_t ⊙ τ_uni|  (sums of per-tensor means);
  task model    θ_t = θ_pre + λ_t · (m_t ⊙ τ_uni).
Everything but λ_t is per tensor, so the unified pack is written in one streaming pass with
the rescalers appended last; a single task's model needs λ_t first (a pre-pass). A task
whose mask is empty gets λ_t = 0 (the reference would divide by zero).

By blocks (tvq.merge.blocks): given the elected sign, everything is elementwise, so a tensor
larger than a block is read, elected, masked and written a block of elements at a time, in
the unified pack (``unified.<key>`` appended piece by piece; each task's mask row spilled to an
unlinked temporary file at its offset and appended from it, since the rows are task-major)
and in a task's model (``block_merger``, after the rescaler's pre-pass, which streams by
blocks too). The same bytes as whole tensors: the sign is elected from ``task_sum`` (tasks
added in order, not torch's size-dependent reduction order), and the per-tensor sums behind
λ_t are ``ChunkSums`` (fixed chunks by flat index, so independent of the block size and of
the thread count). No extra pass is needed, so every tensor larger than a block streams.

Unified pack: one safetensors file with ``unified.<key>`` (fp32), ``masks.<key>`` (uint8
``[T, ceil(n/8)]``: each task's mask bit-packed with ``pack_codes(..., 1)``), ``rescalers``
(fp32 ``[T]``), and string metadata ``format=tvq-emr``, ``version=2``, ``tasks`` (JSON list),
``tensors`` (JSON ``{name: {dtype, shape, sha256}}`` for every stored tensor) and ``digest``
(``manifest_checksum`` of ``{format, version, tasks, tensors}`` with the JSON values parsed).
Running statistics (BatchNorm's running mean/var, ``tvq.normstats``) are not merged: a model
that has them gets ``stats.<key>`` (fp32 ``[T, *shape]``, each task's own τ_t, exactly) and
``version=3``; a pack without statistics is written as version 2, byte for byte as before.
A pack is from a stranger: opening validates all of its metadata and header, and every
tensor is hashed before use. Version-1 packs (no checksums) still read, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from tvq.errors import ConfigError, PackError, TvqError, where
from tvq.io.readers import SafetensorsFile
from tvq.io.safetensors_writer import (
    DTYPE_NAMES,
    StreamingSafetensorsWriter,
    sha256_tensor,
    tensor_bytes,
)
from tvq.merge.blocks import block_elements, model_blocks, tensor_blocks
from tvq.merge.ops import ChunkSums, task_sum
from tvq.merge.registry import MergeMethod, merge_method
from tvq.merge.source import TaskSource
from tvq.pack.manifest import manifest_checksum
from tvq.quant.packing import pack_codes, packed_nbytes, unpack_codes
from tvq.vector import TaskVector

FORMAT = "tvq-emr"
VERSION = "2"  # 2: per-tensor sha256 and a metadata digest; 1: neither (read with a warning)
STATS_VERSION = "3"  # 2 plus each task's running statistics (``stats.<key>``)
LEGACY_VERSION = "1"
MAX_TASKS = 1024
MAX_TASK_NAME = 256
MAX_ELEMENTS = 1 << 36  # per tensor: bounds every allocation a header can ask for
_SHA256 = re.compile(r"[0-9a-f]{64}")


_SPILL_READ = 1 << 24  # bytes of spilled mask rows read back at once


def emr_block(taus: torch.Tensor, before: ChunkSums | None = None, after: ChunkSums | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_uni, masks ``[T, ...]`` bool) of a stack of elements (a whole tensor or a block: every
    operation is elementwise once the sign is elected); adds |τ_t| to ``before`` and
    |m_t ⊙ τ_uni| to ``after`` (row t), the sums behind the rescalers."""
    rows = len(taus)
    flag = torch.where(task_sum(taus).div_(rows) > 0, 1.0, -1.0)  # mean_t τ_t > 0, tasks added in order
    masks = torch.empty(taus.shape, dtype=torch.bool)
    magnitude = torch.zeros_like(flag)
    for t in range(rows):  # one task at a time: temporaries stay at one tensor
        masks[t] = (taus[t] * flag) > 0
        kept = taus[t].abs()
        if before is not None:
            before.add(t, kept)
        torch.maximum(magnitude, kept.mul_(masks[t]), out=magnitude)
    if after is not None:
        for t in range(rows):
            after.add(t, magnitude * masks[t])
    return magnitude.mul_(flag), masks


def _means(before: ChunkSums, after: ChunkSums, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor's mean|τ_t| and mean|m_t ⊙ τ_uni| (``[T]`` float64) from its sums over ``n`` elements."""
    n = max(n, 1)
    return before.finish() / n, after.finish() / n


def rescalers(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """λ_t = Σ mean|τ_t| / Σ mean|m_t τ_uni|, 0 where the masked unified vector is empty."""
    return torch.where(after > 0, before / after.clamp(min=1e-300), 0.0).float()


@merge_method("emr", aliases=("emr_merging",))
class EMR(MergeMethod):
    """Without ``task``: ``write_pack`` writes the unified pack. With ``task``: that task's model."""

    per_task = True
    scale: float = 0.0

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        if self.task is None:
            return
        rows = len(self.tasks)
        before = torch.zeros(rows, dtype=torch.float64)
        after = torch.zeros_like(before)
        sums: tuple[ChunkSums, ChunkSums] | None = None
        current = ""
        for key, _, block in model_blocks(source, desc="emr: rescalers (pre-pass)", progress=progress):
            if sums is None or key != current:
                if sums is not None:  # the previous tensor is complete: its means, in key order
                    b, a = _means(*sums, source.numel(current))
                    before += b
                    after += a
                sums, current = (ChunkSums(rows), ChunkSums(rows)), key
            emr_block(block, *sums)
            del block  # before the next block is read
        if sums is not None:
            b, a = _means(*sums, source.numel(current))
            before += b
            after += a
        self.scale = float(rescalers(before, after)[self.tasks.index(self.task)])

    def merges_by_blocks(self, key: str, numel: int) -> bool:
        """A task's model merges by blocks: λ_t comes from the pre-pass, the rest is elementwise
        (no extra pass per tensor, so every tensor larger than a block streams)."""
        return self.task is not None

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        if self.task is None:
            raise ConfigError("emr writes a unified pack, or one task's model with --task NAME")
        unified, masks = emr_block(taus)
        return unified.mul_(masks[self.tasks.index(self.task)]).mul_(self.scale)

    def write_pack(self, source: TaskSource, out: Path, progress: bool = False) -> None:
        """Stream the unified pack: each tensor is hashed as it is appended, the metadata sealed last."""
        problem = task_names_problem(self.tasks)
        if problem:
            raise ConfigError(f"emr: cannot write a unified pack: {problem}")
        keys, t, stats = source.keys, len(self.tasks), source.float_statistics
        shapes = {f"unified.{k}": ("F32", list(source.shape(k))) for k in keys}
        shapes.update({f"masks.{k}": ("U8", [t, packed_nbytes(source.numel(k), 1)]) for k in keys})
        shapes["rescalers"] = ("F32", [t])
        shapes.update({f"stats.{k}": ("F32", [t, *source.shape(k)]) for k in stats})
        writer = _ChecksummedWriter(out, self.tasks, shapes, STATS_VERSION if stats else VERSION)
        try:
            before = torch.zeros(t, dtype=torch.float64)
            after = torch.zeros_like(before)
            for key in tqdm(keys, desc="emr: unified pack", unit="tensor", disable=not progress):
                b, a = self._write_tensor(writer, source, key, out)
                before += b
                after += a
            writer.add("rescalers", rescalers(before, after))
            for key in stats:  # each task's own statistics, exactly (tiny: one vector per norm layer)
                writer.add(f"stats.{key}", torch.stack([source.tensor(task, key) for task in self.tasks]))
            writer.close()
        except BaseException:
            writer.abort()
            raise

    def _write_tensor(self, writer: _ChecksummedWriter, source: TaskSource, key: str, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """``unified.<key>`` and ``masks.<key>``, whole or (larger than a block, every input
        readable by blocks) a block at a time; returns the tensor's mean|τ_t| and mean|m_t ⊙ τ_uni|."""
        t, n = len(self.tasks), source.numel(key)
        sums = ChunkSums(t), ChunkSums(t)
        if n <= block_elements(None, t) or source.blocks(key) is None:
            unified, masks = emr_block(source.stack(key), *sums)
            writer.add(f"unified.{key}", unified)
            writer.add(f"masks.{key}", torch.stack([pack_codes(m.reshape(-1).to(torch.uint8), 1) for m in masks]))
            del unified, masks  # before the next tensor's are built
            return _means(*sums, n)
        row = packed_nbytes(n, 1)
        with tempfile.TemporaryFile(dir=out.parent, prefix=".emr-masks-") as spill:

            def pieces() -> Iterator[torch.Tensor]:
                for start, block in tensor_blocks(source, key):  # starts are multiples of 8: whole mask bytes
                    unified, masks = emr_block(block, *sums)
                    del block
                    for i, mask in enumerate(masks):
                        _write_at(spill, tensor_bytes(pack_codes(mask.to(torch.uint8), 1)), i * row + start // 8)
                    del masks
                    yield unified
                    del unified  # written: not held while the next block is merged

            writer.add_chunks(f"unified.{key}", torch.float32, source.shape(key), pieces())
            writer.add_chunks(f"masks.{key}", torch.uint8, (t, row), _read_back(spill, t * row))
        return _means(*sums, n)


def _write_at(fh: IO[bytes], data: memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        done = os.pwrite(fh.fileno(), view, offset)
        view, offset = view[done:], offset + done


def _read_back(fh: IO[bytes], size: int) -> Iterator[torch.Tensor]:
    """The spilled mask rows, in file order, ``_SPILL_READ`` bytes at a time."""
    at = 0
    while at < size:
        data = os.pread(fh.fileno(), min(_SPILL_READ, size - at), at)
        if not data:
            raise OSError(f"{fh.name}: the spilled EMR masks end at byte {at} of {size}")
        at += len(data)
        yield torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _entry(dtype: str, shape: list[int], sha256: str) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "sha256": sha256}


def sealed_metadata(tasks: list[str], tensors: dict[str, dict[str, Any]], version: str = VERSION) -> dict[str, str]:
    """The safetensors metadata of a version-2 (or 3) pack: the digest covers everything else in it."""
    digest = manifest_checksum({"format": FORMAT, "version": version, "tasks": tasks, "tensors": tensors})
    listed = json.dumps(tensors, separators=(",", ":"))
    return {"format": FORMAT, "version": version, "tasks": json.dumps(tasks), "tensors": listed, "digest": digest}


class _ChecksummedWriter(StreamingSafetensorsWriter):
    """The streaming writer, plus a sha256 per tensor taken as it is added and sealed at close.

    The metadata starts as a placeholder of the final size (the expected shapes, zero hashes),
    so the header room reserved up front fits the real one and the data is never moved."""

    def __init__(self, path: Path, tasks: list[str], shapes: dict[str, tuple[str, list[int]]], version: str = VERSION) -> None:
        self._tasks = list(tasks)
        self._version = version
        self._sums = {name: _entry(dtype, shape, "0" * 64) for name, (dtype, shape) in shapes.items()}
        super().__init__(path, list(shapes), sealed_metadata(self._tasks, self._sums, version))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        super().add(name, tensor)
        self._sums[name] = _entry(DTYPE_NAMES[tensor.dtype], list(tensor.shape), sha256_tensor(tensor))

    def add_chunks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | list[int], chunks: Iterable[torch.Tensor]) -> None:
        digest = hashlib.sha256()

        def hashed() -> Iterator[torch.Tensor]:
            for chunk in chunks:
                digest.update(tensor_bytes(chunk))
                yield chunk

        super().add_chunks(name, dtype, shape, hashed())
        self._sums[name] = _entry(DTYPE_NAMES[dtype], list(shape), digest.hexdigest())

    def close(self) -> int:
        self._metadata = sealed_metadata(self._tasks, self._sums, self._version)
        return super().close()


def task_names_problem(tasks: object) -> str | None:
    """Why ``tasks`` is not a valid task list (None when it is): names are printed in one-line messages."""
    if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_TASKS:
        return f"'tasks' must be a JSON list of 1 to {MAX_TASKS} task names"
    for name in tasks:
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_TASK_NAME or not name.isprintable():
            return f"task name {ascii(name)[:80]} is not a printable string of 1 to {MAX_TASK_NAME} characters"
    if len(set(tasks)) != len(tasks):
        return "'tasks' names a task twice"
    return None


def _strict_json(text: object, field: str, path: Path) -> Any:
    """A metadata value parsed as JSON, refusing NaN/Infinity and repeated object keys."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            raise ValueError("an object repeats a key")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(str(text), object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError) as exc:
        raise PackError(f"{where(path)}: malformed EMR metadata: {field!r} is not valid JSON ({str(exc)[:120]})") from None


def _one_line(exc: BaseException) -> str:
    """A library's error message fit for the CLI's single ``error:`` line."""
    return " ".join(str(exc).split())[:300]


def _entry_ok(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and set(entry) == {"dtype", "shape", "sha256"}
        and isinstance(entry["dtype"], str)
        and isinstance(entry["shape"], list)
        and all(type(d) is int and d >= 0 for d in entry["shape"])
        and isinstance(entry["sha256"], str)
        and _SHA256.fullmatch(entry["sha256"]) is not None
    )


class EMRPack:
    """A unified EMR pack opened lazily: ``task_vector(name)`` is λ_t · (m_t ⊙ τ_uni).

    Opening validates the metadata and the header completely (a stranger's file is refused
    with one line before anything is allocated from it); each tensor read is checked against
    its sha256 before use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise PackError(f"{where(self.path)}: EMR pack not found")
        try:
            self._file = SafetensorsFile(self.path)
            with safe_open(str(self.path), framework="pt") as handle:
                meta = dict(handle.metadata() or {})
        except TvqError as exc:
            raise PackError(_one_line(exc)) from None
        except Exception as exc:
            raise PackError(f"{where(self.path)}: not a readable safetensors file ({_one_line(exc)})") from None
        if meta.get("format") != FORMAT:
            raise PackError(f"{where(self.path)}: not a tvq EMR pack (metadata format={ascii(meta.get('format'))[:40]})")
        self.tasks, self._recorded = self._read_metadata(meta)
        self._sums = None if self._recorded is None else {name: e["sha256"] for name, e in self._recorded.items()}
        self.keys = [n.removeprefix("unified.") for n in self._file.metas if n.startswith("unified.")]
        self.stat_keys = [n.removeprefix("stats.") for n in self._file.metas if n.startswith("stats.")]
        self._stat_set = set(self.stat_keys)
        self._check_header()
        self.rescalers = self._verified("rescalers")
        if not bool(torch.isfinite(self.rescalers).all()) or bool((self.rescalers < 0).any()):
            raise PackError(f"{where(self.path, 'rescalers')}: rescalers must be finite and non-negative")
        if self._recorded is None:
            print(f"warning: {self.path}: EMR pack version 1 has no checksums; its tensors cannot be verified", file=sys.stderr)

    def _read_metadata(self, meta: dict[str, str]) -> tuple[list[str], dict[str, dict[str, Any]] | None]:
        """The task names, and each tensor's recorded dtype, shape and sha256 (None in version 1)."""
        version = meta.get("version")
        if version not in (VERSION, STATS_VERSION, LEGACY_VERSION):
            supported = f"this tvq reads {LEGACY_VERSION} to {STATS_VERSION}"
            raise PackError(f"{where(self.path)}: EMR pack version {ascii(version)[:40]} is not supported ({supported})")
        self.version = version
        expected = {"format", "version", "tasks"} | ({"tensors", "digest"} if version != LEGACY_VERSION else set())
        if set(meta) != expected:
            odd = min(set(meta) ^ expected)
            state = "missing" if odd in expected else "unknown"
            raise PackError(f"{where(self.path)}: malformed EMR metadata: key {ascii(odd)[:80]} is {state}")
        tasks = _strict_json(meta["tasks"], "tasks", self.path)
        recorded = None
        if version != LEGACY_VERSION:
            recorded = _strict_json(meta["tensors"], "tensors", self.path)
            body = {"format": FORMAT, "version": version, "tasks": tasks, "tensors": recorded}
            if meta["digest"] != manifest_checksum(body):
                raise PackError(f"{where(self.path)}: EMR metadata checksum mismatch (the file was modified)")
            if not isinstance(recorded, dict):
                raise PackError(f"{where(self.path)}: malformed EMR metadata: 'tensors' must be a JSON object")
            for name in [n for n, e in recorded.items() if not _entry_ok(e)][:1]:
                raise PackError(f"{where(self.path)}: malformed EMR metadata: 'tensors' entry {ascii(name)[:120]} must hold dtype, shape, sha256")
        problem = task_names_problem(tasks)
        if problem:
            raise PackError(f"{where(self.path)}: malformed EMR metadata: {problem}")
        return tasks, recorded

    def _check_header(self) -> None:
        """Every tensor expected, nothing else, with consistent dtypes and sizes, before any read."""
        names = self._file.keys()
        prefixes = ("unified.", "masks.", "stats.") if self.version == STATS_VERSION else ("unified.", "masks.")
        for name in names:
            if not name.isprintable() or not (name == "rescalers" or name.startswith(prefixes)):
                raise PackError(f"{where(self.path)}: unknown tensor {ascii(name)[:120]} in an EMR pack")
        present = set(names)
        keys = {n.removeprefix("unified.") for n in names if n.startswith("unified.")}
        keys |= {n.removeprefix("masks.") for n in names if n.startswith("masks.")}
        required = {"rescalers", *(f"unified.{k}" for k in keys), *(f"masks.{k}" for k in keys)}
        for name in sorted(required - present)[:1]:
            raise PackError(f"{where(self.path, name)}: missing from the EMR pack")
        t = len(self.tasks)
        self._expect("rescalers", torch.float32, (t,))
        for key in self.keys:
            n = self.numel(key)
            if n > MAX_ELEMENTS:
                raise PackError(f"{where(self.path, f'unified.{key}')}: {n} elements, more than the {MAX_ELEMENTS} an EMR pack may hold")
            self._expect(f"unified.{key}", torch.float32, self.shape(key))
            self._expect(f"masks.{key}", torch.uint8, (t, packed_nbytes(n, 1)))
        for key in self.stat_keys:
            if f"unified.{key}" in present:
                raise PackError(f"{where(self.path, f'stats.{key}')}: stored both as a statistic and as a merged tensor")
            meta = self._file.metas[f"stats.{key}"]
            if len(meta.shape) < 1 or meta.shape[0] != t or math.prod(meta.shape) > MAX_ELEMENTS:
                raise PackError(f"{where(self.path, f'stats.{key}')}: shape {list(meta.shape)} is not [{t}, ...] (one row per task)")
            self._expect(f"stats.{key}", torch.float32, tuple(meta.shape))
        if self._recorded is None:
            return
        for name in sorted(present ^ set(self._recorded))[:1]:
            state = "no checksum recorded" if name in present else "recorded but missing from the file"
            raise PackError(f"{where(self.path, name)}: {state}")
        for name in names:
            entry, meta = self._recorded[name], self._file.metas[name]
            if entry["dtype"] != DTYPE_NAMES.get(meta.dtype) or tuple(entry["shape"]) != meta.shape:
                raise PackError(
                    f"{where(self.path, name)}: header says {DTYPE_NAMES.get(meta.dtype)} {list(meta.shape)}, "
                    f"the checksummed metadata {entry['dtype']} {entry['shape']} (modified)"
                )

    def _expect(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        meta = self._file.metas[name]
        if meta.dtype != dtype or meta.shape != shape:
            raise PackError(
                f"{where(self.path, name)}: stored as {DTYPE_NAMES.get(meta.dtype, meta.dtype)} {list(meta.shape)}, "
                f"expected {DTYPE_NAMES[dtype]} {list(shape)} (for {len(self.tasks)} tasks)"
            )

    def _verified(self, name: str) -> torch.Tensor:
        """The stored tensor, a buffer of its own, after its sha256 matched (version 2)."""
        try:
            data = self._file.get_tensor(name)
        except TvqError as exc:
            raise PackError(_one_line(exc)) from None
        except Exception as exc:
            raise PackError(f"{where(self.path, name)}: unreadable ({_one_line(exc)})") from None
        if self._sums is not None and sha256_tensor(data) != self._sums[name]:
            raise PackError(f"{where(self.path, name)}: checksum mismatch (EMR pack corrupted or tampered)")
        return data

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key`` of a task's model (from the validated header)."""
        if key in self._stat_set:
            return tuple(self._file.metas[f"stats.{key}"].shape[1:])
        return tuple(self._file.metas[f"unified.{key}"].shape)

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def mask(self, task: str, key: str) -> torch.Tensor:
        """m_t of one tensor (bool, the unified tensor's shape)."""
        index = self._index(task)
        packed = self._verified(f"masks.{key}")[index]
        return unpack_codes(packed, 1, self.numel(key)).reshape(self.shape(key)).bool()

    def _index(self, task: str) -> int:
        if task not in self.tasks:
            raise ConfigError(f"--task {task!r} is not in the EMR pack {self.path} (tasks: {', '.join(self.tasks)})")
        return self.tasks.index(task)

    def task_tensor(self, task: str, key: str) -> torch.Tensor:
        """τ of one tensor of ``task``'s model: λ_t (m_t ⊙ τ_uni), or for a running statistic the task's own."""
        if key in self._stat_set:
            return self._verified(f"stats.{key}")[self._index(task)].clone()
        scale = float(self.rescalers[self._index(task)])
        unified = self._verified(f"unified.{key}")
        return (unified * self.mask(task, key)).mul_(scale)

    def task_vector(self, task: str) -> TaskVector:
        self._index(task)
        return TaskVector([*self.keys, *self.stat_keys], lambda key: self.task_tensor(task, key), name=task)

    def task_blocks(self, task: str, key: str) -> EMRTaskBlocks | None:
        """λ_t (m_t ⊙ τ_uni) of one tensor by element blocks read in order (None for a running
        statistic: read whole); each stored tensor's sha256 is checked before its last block is returned."""
        if key in self._stat_set:
            return None
        return EMRTaskBlocks(self, self._index(task), key)

    def _check_sum(self, name: str, digest: Any) -> None:
        if self._sums is not None and digest.hexdigest() != self._sums[name]:
            raise PackError(f"{where(self.path, name)}: checksum mismatch (EMR pack corrupted or tampered)")


class EMRTaskBlocks:
    """One task's τ of one tensor of a unified pack, a block of elements at a time (blocks in
    order, starting at multiples of 8: whole mask bytes): only the block's unified elements
    and mask bytes are decoded. ``unified.<key>`` is hashed as it is read; ``masks.<key>`` is
    hashed in file order (the other tasks' rows are read for that alone, before the first
    block and after the last); both are checked before the last block is returned, so a
    tampered pack writes no output (outputs are atomic)."""

    def __init__(self, pack: EMRPack, index: int, key: str) -> None:
        self.pack, self.index, self.key = pack, index, key
        self.n = pack.numel(key)
        self.row = packed_nbytes(self.n, 1)
        self.scale = float(pack.rescalers[index])
        self.unified_sum, self.masks_sum = hashlib.sha256(), hashlib.sha256()
        self.next = 0

    def _hash_masks(self, start: int, end: int) -> None:
        """Feed mask bytes ``[start, end)`` of the whole ``[T, row]`` tensor to its hash."""
        if self.pack._sums is None:  # version 1: nothing to check against
            return
        for at in range(start, end, _SPILL_READ):
            self.masks_sum.update(tensor_bytes(self._read(f"masks.{self.key}", at, min(_SPILL_READ, end - at))))

    def _read(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        try:
            return self.pack._file.read_bytes(name, offset, nbytes)
        except TvqError as exc:
            raise PackError(_one_line(exc)) from None

    def read(self, start: int, end: int) -> torch.Tensor:
        if start != self.next or start % 8 or not start < end <= self.n:
            raise RuntimeError(f"'{self.key}': EMR blocks must come in order from multiples of 8 (got [{start}, {end}))")
        if start == 0:
            self._hash_masks(0, self.index * self.row)
        self.next = end
        first, last = start // 8, packed_nbytes(end, 1)
        unified = self._read(f"unified.{self.key}", start * 4, (end - start) * 4).view(torch.float32)
        packed = self._read(f"masks.{self.key}", self.index * self.row + first, last - first)
        self.unified_sum.update(tensor_bytes(unified))
        self.masks_sum.update(tensor_bytes(packed))
        if end == self.n:
            self._hash_masks((self.index + 1) * self.row, len(self.pack.tasks) * self.row)
            self.pack._check_sum(f"unified.{self.key}", self.unified_sum)
            self.pack._check_sum(f"masks.{self.key}", self.masks_sum)
        mask = unpack_codes(packed, 1, end - start).bool()
        return (unified * mask).mul_(self.scale)


def open_emr(path: str | Path) -> EMRPack:
    """Open and validate a unified EMR pack (``PackError`` with one line when it is malformed)."""
    return EMRPack(path)
