"""Reading packs lazily: one tensor of one task is decoded without touching the rest.

Every read checks the tensor's sha256 against the manifest; opening checks the manifest's
own digest, the format version, and each file's size (a truncated file fails at once).
``Pack.verify()`` re-hashes whole files.
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property, partial
from pathlib import Path

import torch
from pydantic import ValidationError

from tvq.config import validation_problem
from tvq.errors import PackError, where
from tvq.io.dtypes import TORCH_DTYPES, dtype_name
from tvq.io.paths import confined
from tvq.io.readers import CheckpointReader, SafetensorsFile, element_reader, open_checkpoint
from tvq.io.safetensors_writer import sha256_file, sha256_tensor
from tvq.pack.blocks import StoredBlocks, TaskBlocks, blockable
from tvq.pack.manifest import (
    FORMAT_NAME,
    MANIFEST_NAME,
    READABLE_VERSIONS,
    Manifest,
    Method,
    QuantizedEntry,
    RawEntry,
    TensorEntry,
    aux_key,
    manifest_checksum,
)
from tvq.pack.validate import validate_manifest
from tvq.quant.coded import CodedTensor
from tvq.quant.entropy import StreamError, aligned_nbytes, codes_from_aligned, decode, decode_raw_bytes
from tvq.quant.packing import unpack_codes
from tvq.quant.schemes import decode_problem, get_scheme
from tvq.vector import TaskVector

MAX_MANIFEST_BYTES = 1 << 30  # ~2.5 M tensor entries; a manifest is read whole, so it is capped


def read_manifest(path: Path) -> Manifest:
    """The pack's manifest, parsed with exact types and validated completely (see
    tvq.pack.validate): after this, every name it holds is confined to the pack and every
    number it holds is safe to allocate and decode with."""
    file = path / MANIFEST_NAME
    if not path.exists():
        raise PackError(f"{where(path)}: pack not found")
    if not path.is_dir():
        raise PackError(f"{where(path)}: not a tvq pack (a pack is a folder)")
    if not file.is_file() or file.is_symlink():
        raise PackError(f"{where(path)}: not a tvq pack (no {MANIFEST_NAME}, or it is not a regular file)")
    try:
        size = file.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise PackError(f"{where(file)}: manifest of {size} bytes is larger than the {MAX_MANIFEST_BYTES >> 20} MiB cap")
        with _no_gc():  # a big manifest is millions of small objects: collection would be quadratic-ish
            raw = json.loads(file.read_bytes())
    except PackError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise PackError(f"{where(file)}: unreadable manifest ({str(exc)[:200]})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise PackError(f"{where(file)}: not a tvq pack manifest")
    if raw.get("version") not in READABLE_VERSIONS or isinstance(raw.get("version"), bool):
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise PackError(f"{where(file)}: pack format version {str(raw.get('version'))[:20]} is not supported (this tvq reads {readable})")
    try:
        with _no_gc():
            manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise PackError(f"{where(file)}: invalid manifest: {validation_problem(exc, nested=True)}") from None
    as_written = manifest_checksum({k: v for k, v in raw.items() if k != "digest"})  # tvq writes every field: no re-dump
    if manifest.digest != as_written and manifest.digest != manifest.compute_digest():
        raise PackError(f"{where(file)}: manifest checksum mismatch (the file was modified)")
    validate_manifest(manifest, file)
    return manifest


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a manifest's objects are built (they hold no
    cycles): its generational passes revisit every new object many times over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Pack:
    """An opened pack. FQ packs need the pretrained model to form task vectors."""

    def __init__(self, path: str | Path, pretrained: str | Path | CheckpointReader | None = None, unsafe_pickle: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._handles: dict[str, SafetensorsFile] = {}
        self._base_cache: dict[str, CodedTensor | None] = {}
        self._lock = threading.Lock()
        self._pretrained_arg = pretrained
        self._unsafe_pickle = unsafe_pickle
        for rel, entry in self.manifest.files.items():
            file = confined(self.path, rel, self.path / MANIFEST_NAME, error=PackError)  # no symlink out of the pack
            if not file.is_file():
                raise PackError(f"{where(file)}: missing from the pack")
            size = file.stat().st_size
            if size != entry.bytes:
                raise PackError(f"{where(file)}: size {size} bytes, manifest says {entry.bytes} (truncated or modified)")

    # -- what is inside -------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.manifest.tasks]

    @property
    def method(self) -> Method:
        return self.manifest.method

    @cached_property
    def keys(self) -> list[str]:
        """The task-vector tensor names (float tensors of the model)."""
        first = self.manifest.tasks[0].file
        return list(self.manifest.files[first].tensors)

    def entry(self, task: str, key: str) -> TensorEntry:
        return self._tensor_entry(self.manifest.task(task).file, key)

    def same_tensor(self, task: str, key: str, other: str) -> bool:
        """Whether τ̂ of ``key`` and ``other`` are the same for ``task``, from the manifest alone:
        equal entries (scheme, parameters, sha256 of the stored bytes) in the task's file and the
        RTVQ base's (tied weights quantized under two names are)."""
        files = [self.manifest.task(task).file] + ([self.manifest.base_file] if self.manifest.base_file else [])
        return all(self.manifest.files[rel].tensors.get(key) == self.manifest.files[rel].tensors.get(other) for rel in files)

    def _tensor_entry(self, rel: str, key: str) -> TensorEntry:
        try:
            return self.manifest.files[rel].tensors[key]
        except KeyError:
            raise PackError(f"{where(self.path / rel, key)}: no such tensor in the pack") from None

    def file_bytes(self, rel: str) -> int:
        return self.manifest.files[rel].bytes

    def total_bytes(self) -> int:
        """Bytes on disk of the whole pack, manifest included."""
        return sum(f.bytes for f in self.manifest.files.values()) + (self.path / "manifest.json").stat().st_size

    # -- decoding -------------------------------------------------------------------------
    def _handle(self, rel: str) -> SafetensorsFile:
        if rel not in self._handles:
            try:
                self._handles[rel] = SafetensorsFile(self.path / rel)
            except Exception as exc:
                raise PackError(f"{where(self.path / rel)}: corrupt pack file ({exc})") from None
        return self._handles[rel]

    def decode(self, rel: str, key: str) -> torch.Tensor:
        """The stored value of one tensor: dequantized codes, or the raw tensor as stored."""
        entry = self._tensor_entry(rel, key)
        if entry.kind == "const":
            return torch.full(tuple(entry.shape), entry.value, dtype=torch.float32)
        if entry.kind == "raw":
            data = self._raw(rel, key, entry)
            if data.is_floating_point() and not bool(torch.isfinite(data).all()):
                raise PackError(f"{where(self.path / rel, key)}: stored tensor contains NaN or Inf")
            return data  # a fresh buffer (SafetensorsFile reads, never maps): safe to hand out
        codes = self._codes(rel, key, entry)
        aux = self._aux(rel, key, entry)
        return get_scheme(entry.scheme).decode(codes, entry.bits, entry.params, aux).reshape(entry.shape)

    def _raw(self, rel: str, key: str, entry: RawEntry) -> torch.Tensor:
        """A raw tensor as stored (its own bytes), decoded first when entropy-coded (the sha256
        covers the bytes on disk; the decoder checks the stream, see tvq.quant.entropy)."""
        dtype = TORCH_DTYPES[entry.dtype]
        coding = entry.entropy
        if coding is None:
            return self._read_verified(rel, key, entry.sha256, dtype, entry.shape)
        data = self._read_verified(rel, key, entry.sha256, torch.uint8, [entry.nbytes])
        try:
            raw = decode_raw_bytes(data, coding.blocks, coding.block, entry.numel * dtype.itemsize, dtype.itemsize)
        except StreamError as exc:
            raise PackError(f"{where(self.path / rel, key)}: malformed entropy-coded stream: {exc}") from None
        return raw.view(dtype).reshape(entry.shape)

    def _codes(self, rel: str, key: str, entry: QuantizedEntry) -> torch.Tensor:
        """The codes of one tensor, flat uint8: unpacked, after decoding them when entropy-coded
        (the sha256 covers the bytes on disk; the decoder checks the stream, see tvq.quant.entropy)."""
        data = self._read_verified(rel, key, entry.sha256, torch.uint8, [entry.nbytes])
        coding = entry.entropy
        if coding is None:
            return unpack_codes(data, entry.bits, entry.numel)
        try:
            aligned = decode(data, coding.blocks, coding.block, aligned_nbytes(entry.numel, entry.bits))
            return codes_from_aligned(aligned, entry.bits, entry.numel)
        except StreamError as exc:
            raise PackError(f"{where(self.path / rel, key)}: malformed entropy-coded stream: {exc}") from None

    def _aux(self, rel: str, key: str, entry: QuantizedEntry) -> dict[str, torch.Tensor]:
        """The per-group arrays of a group-wise entry, checked to decode to finite values."""
        if not entry.aux:
            return {}
        shape = [entry.aux_numel]
        aux = {name: self._read_verified(rel, aux_key(key, name), a.sha256, torch.float32, shape) for name, a in entry.aux.items()}
        problem = decode_problem(entry.scheme, entry.bits, entry.params, aux)
        if problem:
            raise PackError(f"{where(self.path / rel, key)}: {problem}")
        return aux

    def _read_verified(self, rel: str, name: str, sha256: str, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """One stored array, checked against the manifest: dtype, shape, then its sha256."""
        try:
            handle = self._handle(rel)
            meta = handle.metas.get(name)
            if meta is None:
                raise PackError(f"{where(self.path / rel, name)}: missing from the pack file")
            if meta.dtype != dtype or list(meta.shape) != list(shape):
                raise PackError(
                    f"{where(self.path / rel, name)}: stored as {dtype_name(meta.dtype)} {list(meta.shape)}, "
                    f"the manifest says {dtype_name(dtype)} {list(shape)}"
                )
            data = handle.get_tensor(name)
        except PackError:
            raise
        except Exception as exc:
            raise PackError(f"{where(self.path / rel, name)}: unreadable ({exc})") from None
        if sha256_tensor(data) != sha256:
            raise PackError(f"{where(self.path / rel, name)}: checksum mismatch (pack file corrupted or tampered)")
        return data

    @cached_property
    def pretrained(self) -> CheckpointReader:
        """The pretrained model the caller named. The path recorded in the manifest is only
        shown, never opened: it comes from whoever made the pack (see docs/security.md)."""
        arg = self._pretrained_arg
        if arg is None:
            raise PackError(
                f"{where(self.path)}: needs the pretrained model: pass --pretrained "
                f"(the pack was made from {self.manifest.pretrained.path[:300]})"
            )
        if not isinstance(arg, (str, Path)):
            return arg  # an open reader
        path = Path(arg)
        reader = open_checkpoint(path, self._unsafe_pickle)
        available = set(reader.keys())
        for key in self.keys:
            if key not in available or list(reader.meta(key).shape) != self.entry(self.tasks[0], key).shape:
                raise PackError(f"{where(path, key)}: the pretrained model does not match the pack")
        return reader

    def task_tensor(self, task: str, key: str) -> torch.Tensor:
        """τ̂ for one tensor of one task, in fp32, reading only what it needs."""
        rel = self.manifest.task(task).file
        stored = self.decode(rel, key)
        method = self.manifest.method
        if method.target == "finetuned":
            return self._finite(stored.float() - self.pretrained.get(key).float(), rel, key)
        base_file = self.manifest.base_file
        if base_file is not None and key in self.manifest.files[base_file].tensors:
            return self._finite(self.decode(base_file, key) + stored, rel, key)
        return stored.float()

    def _finite(self, tau: torch.Tensor, rel: str, key: str) -> torch.Tensor:
        """A sum or difference of two finite tensors can still overflow: never hand out Inf."""
        if not bool(torch.isfinite(tau).all()):
            raise PackError(f"{where(self.path / rel, key)}: the task vector overflows float32 (NaN or Inf)")
        return tau

    def coded(self, task: str, key: str) -> CodedTensor | None:
        """τ̂ of one tensor as a value table and per-element codes, when it is one: codes of a
        scheme that decodes elementwise (RTVQ: base and offset codes combined), or a constant.
        None for raw tensors, FQ packs and group-wise schemes (merge the dense tensor then)."""
        if self.manifest.method.target == "finetuned":
            return None
        coded = self._coded(self.manifest.task(task).file, key)
        base_file = self.manifest.base_file
        if coded is None or not base_file or key not in self.manifest.files[base_file].tensors:
            return coded
        base = self._base_coded(base_file, key)
        if base is None:
            return None
        table = (base.table[:, None] + coded.table[None, :]).reshape(-1)  # β̂ + ô, as task_tensor adds them
        self._finite(table, self.manifest.task(task).file, key)
        wide = torch.uint8 if table.numel() <= 256 else torch.int32  # uint8 ops are 4x cheaper
        index = base.index.to(wide, copy=True).mul_(coded.values).add_(coded.index.to(wide))  # never in place on the shared base
        return CodedTensor(table, index)

    def _base_coded(self, base_file: str, key: str) -> CodedTensor | None:
        """The RTVQ base's codes of ``key``, shared by every task's ``coded``: read, verified and
        unpacked once per tensor, not once per task (a few recent keys are kept, one per job)."""
        with self._lock:
            if key in self._base_cache:
                return self._base_cache[key]
        base = self._coded(base_file, key)
        with self._lock:
            self._base_cache[key] = base
            while len(self._base_cache) > 8:
                self._base_cache.pop(next(iter(self._base_cache)))
        return base

    def _coded(self, rel: str, key: str) -> CodedTensor | None:
        entry = self._tensor_entry(rel, key)
        if entry.kind == "const":
            return CodedTensor(torch.tensor([entry.value], dtype=torch.float32), torch.zeros(entry.numel, dtype=torch.uint8))
        if entry.kind == "raw":
            return None
        scheme = get_scheme(entry.scheme)
        if scheme.aux_names:
            return None
        codes = self._codes(rel, key, entry)
        every_code = torch.arange(2**entry.bits, dtype=torch.int32).to(torch.uint8)
        return CodedTensor(scheme.decode(every_code, entry.bits, entry.params, {}).reshape(-1).float(), codes)

    def task_blocks(self, task: str, key: str) -> TaskBlocks | None:
        """τ̂ of one tensor of one task a block of elements at a time (tvq.pack.blocks), or None
        where it does not decode by blocks: group-wise schemes, an RTVQ tensor stored raw, an
        FQ pack over a pretrained model that cannot be read by blocks."""
        rel = self.manifest.task(task).file
        entry = self._tensor_entry(rel, key)
        base_file = self.manifest.base_file
        base_entry = self._tensor_entry(base_file, key) if base_file and key in self.manifest.files[base_file].tensors else None
        finetuned = self.manifest.method.target == "finetuned"
        pre = element_reader(self.pretrained) if finetuned else None
        if not blockable(entry) or (finetuned and pre is None):
            return None
        if base_entry is not None and (not blockable(base_entry) or entry.kind == "raw" or base_entry.kind == "raw"):
            return None
        stored = StoredBlocks(self._handle(rel) if entry.kind != "const" else None, key, entry, where(self.path / rel, key))
        base = None
        if base_entry is not None and base_file is not None:
            handle = self._handle(base_file) if base_entry.kind != "const" else None
            base = StoredBlocks(handle, key, base_entry, where(self.path / base_file, key))
        elements = partial(pre.get_elements, key) if pre is not None else None
        return TaskBlocks(stored, base, elements, where(self.path / rel, key))

    def base_tensor(self, key: str) -> torch.Tensor:
        if not self.manifest.base_file:
            raise PackError(f"{where(self.path)}: not an RTVQ pack (no base vector)")
        return self.decode(self.manifest.base_file, key)

    def task_vector(self, task: str) -> TaskVector:
        self.manifest.task(task)  # fails early on unknown names
        return TaskVector(self.keys, lambda key: self.task_tensor(task, key), name=task)

    def task_vectors(self) -> dict[str, TaskVector]:
        return {name: self.task_vector(name) for name in self.tasks}

    def verify(self) -> None:
        """Re-hash every file against the manifest (reads the whole pack; every name was
        confined to the pack when it was opened)."""
        for rel, entry in self.manifest.files.items():
            if sha256_file(self.path / rel) != entry.sha256:
                raise PackError(f"{where(self.path / rel)}: checksum mismatch (pack file corrupted or tampered)")


def open_pack(path: str | Path, pretrained: str | Path | CheckpointReader | None = None, unsafe_pickle: bool = False) -> Pack:
    """Open a pack lazily: ``open_pack(p).task_vector("sst2")["layer.0.weight"]``."""
    return Pack(path, pretrained, unsafe_pickle)
