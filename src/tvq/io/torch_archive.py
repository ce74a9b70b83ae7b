"""The two containers of ``torch.save``: where the pickle program is, and where each storage's
bytes lie in the file, every range checked to lie inside the file before anything is read.

* The zip format (torch >= 1.6): ``<prefix>/data.pkl`` holds the program, ``<prefix>/data/<key>``
  each storage's bytes, stored uncompressed (torch writes them so); ``byteorder``, ``version``
  and the other small records sit beside them. Each storage entry's local header is parsed
  here to find where its bytes start; entries may not overlap, and a storage's bytes must be
  exactly what its element type and count in the program say.
* The legacy format (``_use_new_zipfile_serialization=False``): five pickles in a row (a magic
  number, a protocol version, system information, the program, the storage keys), then each
  storage as an 8-byte element count and its bytes, in the order of those keys.

The program itself is read by :mod:`tvq.io.torch_pickle`, without running its code.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from tvq.errors import CheckpointError, where
from tvq.io.checkpoint_base import one_line, regular_file
from tvq.io.torch_pickle import PickleRefused, StorageRef, load_program, storage_ref

MAX_PROGRAM_BYTES = 256 << 20  # data.pkl of a ViT-L image encoder is ~100 KB
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ZIP_LOCAL = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature ... name length, extra length
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")


@dataclass(frozen=True)
class Span:
    """Where an entry's bytes lie in the file."""

    offset: int
    nbytes: int


@dataclass(frozen=True)
class CrcField:
    """Where a zip entry's CRC-32 is written: its central directory record, and its data
    descriptor when the entry has one (torch's writer sets the local header's to 0)."""

    central: int
    descriptor: int | None
    local: int | None


@dataclass
class TorchArchive:
    """A torch file opened for reading: the program's object (built inertly), each storage's
    bytes, and (zip) where each storage's CRC-32 lives, for writing the file back."""

    path: Path
    kind: Literal["zip", "legacy"]
    root: Any
    spans: dict[str, Span]
    size: int
    crcs: dict[str, CrcField] = field(default_factory=dict)
    globals: set[str] = field(default_factory=set)

    def span(self, storage: StorageRef) -> Span:
        """The bytes of ``storage``, checked to be exactly its element count times its element size."""
        span = self.spans.get(storage.key)
        if span is None:
            raise CheckpointError(f"{where(self.path)}: the program names storage {storage.key!r}, which the file does not hold")
        expected = storage.numel * storage.dtype.itemsize
        if span.nbytes != expected:
            raise CheckpointError(
                f"{where(self.path)}: storage {storage.key!r} holds {span.nbytes} bytes, but the program says "
                f"{storage.numel} elements of {str(storage.dtype).removeprefix('torch.')} ({expected} bytes)"
            )
        return span

    def span_of(self, key: str) -> Span:
        return self.spans[key]


def is_torch_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == ZIP_LOCAL


def open_archive(path: Path) -> TorchArchive:
    """Parse a torch file (zip or legacy): every failure is one CheckpointError line."""
    size = regular_file(path)
    try:
        if is_torch_zip(path):
            return _open_zip(path, size)
        return _open_legacy(path, size)
    except CheckpointError:
        raise
    except PickleRefused as exc:
        raise CheckpointError(
            f"{where(path)}: refers to {exc}, code a model file has no use for; not loaded, not even with --unsafe-pickle"
        ) from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, OverflowError, RecursionError, MemoryError, struct.error, UnicodeDecodeError) as exc:  # fmt: skip
        raise CheckpointError(f"{where(path)}: not a readable torch file ({type(exc).__name__}: {one_line(str(exc))})") from None


def _open_zip(path: Path, size: int) -> TorchArchive:
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        infos = zf.infolist()
        programs = [i for i in infos if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
        if len(programs) != 1:
            raise CheckpointError(f"{where(path)}: a zip file, but not one torch.save wrote ({len(programs)} '<name>/data.pkl' entries)")
        prefix = programs[0].filename[: -len("data.pkl")]
        entries: dict[str, Span] = {}
        crcs: dict[str, CrcField] = {}
        central = _central_offsets(fh, zf, infos, size)
        for info in infos:
            if not info.filename.startswith(prefix):
                raise CheckpointError(f"{where(path)}: entry {info.filename[:80]!r} lies outside the archive's folder {prefix!r}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{where(path)}: entry {info.filename[:80]!r} is compressed (torch stores every entry as is)")
            span, local_crc = _local_span(fh, info, size)
            entries[info.filename[len(prefix) :]] = span
            descriptor = span.offset + span.nbytes + (4 if _read_at(fh, span.offset + span.nbytes, 4) == b"PK\x07\x08" else 0)
            has_descriptor = bool(info.flag_bits & 0x08) and descriptor + 4 <= size
            crcs[info.filename[len(prefix) :]] = CrcField(central[info.filename], descriptor if has_descriptor else None, local_crc)
        _no_overlap(path, infos, entries, prefix)
        if entries.get("byteorder") is not None and _read_span(fh, entries["byteorder"]).strip() not in (b"little", b""):
            raise CheckpointError(f"{where(path)}: saved on a big-endian machine (byteorder {_read_span(fh, entries['byteorder'])[:16]!r})")
        program = entries["data.pkl"]
        if program.nbytes > MAX_PROGRAM_BYTES:
            raise CheckpointError(f"{where(path)}: a pickle program of {program.nbytes} bytes (at most {MAX_PROGRAM_BYTES})")
        data = _read_span(fh, program)
    globals_seen: set[str] = set()
    root = load_program(data, storage_ref, globals_seen)
    spans = {name.removeprefix("data/"): span for name, span in entries.items() if name.startswith("data/")}
    storage_crcs = {name.removeprefix("data/"): crc for name, crc in crcs.items() if name.startswith("data/")}
    return TorchArchive(path, "zip", root, spans, size, storage_crcs, globals_seen)


def _read_at(fh: Any, offset: int, n: int) -> bytes:
    fh.seek(offset)
    return fh.read(n)


def _read_span(fh: Any, span: Span) -> bytes:
    return _read_at(fh, span.offset, span.nbytes)


def _local_span(fh: Any, info: zipfile.ZipInfo, size: int) -> tuple[Span, int | None]:
    """Where an entry's bytes start (after its local header, whose name must be the entry's)."""
    header = _read_at(fh, info.header_offset, _LOCAL_HEADER.size)
    bad = f"entry {info.filename[:80]!r}"
    if len(header) < _LOCAL_HEADER.size:
        raise CheckpointError(f"{where(Path(fh.name))}: {bad}: local header past the end of the file")
    sig, _, _, _, _, _, crc, _, _, n_name, n_extra = _LOCAL_HEADER.unpack(header)
    if sig != 0x04034B50:
        raise CheckpointError(f"{where(Path(fh.name))}: {bad}: no local header where the directory says")
    name = fh.read(n_name)
    if name != info.filename.encode("utf-8") and name != info.filename.encode("cp437", errors="replace"):
        raise CheckpointError(f"{where(Path(fh.name))}: {bad}: the local header names {name[:80]!r}")
    start = info.header_offset + _LOCAL_HEADER.size + n_name + n_extra
    if start + info.compress_size > size or info.compress_size != info.file_size:
        raise CheckpointError(f"{where(Path(fh.name))}: {bad}: {info.file_size} bytes at {start} run past the end of the {size}-byte file")
    return Span(start, info.file_size), (info.header_offset + 14 if crc != 0 else None)


def _central_offsets(fh: Any, zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], size: int) -> dict[str, int]:
    """Where each entry's CRC-32 field lies in the central directory (records in order)."""
    offset = zf.start_dir  # zipfile's own attribute: where the central directory starts
    out: dict[str, int] = {}
    for info in infos:
        record = _read_at(fh, offset, _CENTRAL_HEADER.size)
        if len(record) < _CENTRAL_HEADER.size or record[:4] != b"PK\x01\x02":
            raise CheckpointError(f"{where(Path(fh.name))}: central directory record of {info.filename[:80]!r} not where expected")
        fields = _CENTRAL_HEADER.unpack(record)
        n_name, n_extra, n_comment = fields[10], fields[11], fields[12]
        out[info.filename] = offset + 16
        offset += _CENTRAL_HEADER.size + n_name + n_extra + n_comment
        if offset > size:
            raise CheckpointError(f"{where(Path(fh.name))}: central directory runs past the end of the file")
    return out


def _no_overlap(path: Path, infos: list[zipfile.ZipInfo], entries: dict[str, Span], prefix: str) -> None:
    """Entries may not share bytes: writing one storage must never change another entry."""
    ranges = sorted((info.header_offset, entries[info.filename[len(prefix) :]].offset + info.file_size, info.filename) for info in infos)
    for (_, end, name), (start, _, other) in zip(ranges, ranges[1:], strict=False):
        if start < end:
            raise CheckpointError(f"{where(path)}: entries {name[:60]!r} and {other[:60]!r} overlap")


def _open_legacy(path: Path, size: int) -> TorchArchive:
    pids: dict[str, StorageRef] = {}
    globals_seen: set[str] = set()

    def storage(pid: tuple[Any, ...]) -> StorageRef:
        ref = storage_ref(pid)
        known = pids.setdefault(ref.key, ref)
        if known != ref:
            raise pickle.UnpicklingError(f"storage {ref.key!r} described twice, differently")
        return ref

    with open(path, "rb") as raw:
        fh = cast(BinaryIO, BoundedFile(raw, size))  # duck-typed: what the unpickler calls
        head = fh.read(2)
        fh.seek(0)
        if head[:1] != b"\x80":
            raise CheckpointError(f"{where(path)}: not a torch file (neither a zip archive nor a pickle)")
        magic = load_program(fh)
        if magic != LEGACY_MAGIC:
            raise CheckpointError(
                f"{where(path)}: a plain pickle, not a file torch.save wrote; if you trust it, pass --unsafe-pickle"
            )
        if load_program(fh) != LEGACY_PROTOCOL:
            raise CheckpointError(f"{where(path)}: legacy torch file of an unknown protocol version")
        info = load_program(fh)
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise CheckpointError(f"{where(path)}: legacy torch file saved on a big-endian machine (or without system information)")
        root = load_program(fh, storage, globals_seen)
        keys = load_program(fh)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or set(keys) != set(pids):
            raise CheckpointError(f"{where(path)}: legacy torch file whose storage list does not match its program")
        spans: dict[str, Span] = {}
        offset = fh.tell()
        for key in keys:
            ref = pids[key]
            count = _read_at(fh, offset, 8)
            if len(count) < 8:
                raise CheckpointError(f"{where(path)}: storage {key!r} starts past the end of the file")
            (numel,) = struct.unpack("<q", count)
            nbytes = numel * ref.dtype.itemsize
            if numel != ref.numel or offset + 8 + nbytes > size:
                raise CheckpointError(
                    f"{where(path)}: storage {key!r} of {numel} elements (the program says {ref.numel}) at {offset} in a {size}-byte file"
                )
            spans[key] = Span(offset + 8, nbytes)
            offset += 8 + nbytes
    return TorchArchive(path, "legacy", root, spans, size, globals=globals_seen)


class BoundedFile:
    """A file as the unpickler reads it: no read asks for more than the file still holds (a
    length field of 2**62 allocates nothing), and a line is at most ``MAX_LINE`` bytes."""

    MAX_LINE = 1 << 16

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh, self._size = fh, size

    def _left(self) -> int:
        return max(0, self._size - self._fh.tell())

    def read(self, n: int = -1) -> bytes:
        left = self._left()
        return self._fh.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        cap = min(self._left(), self.MAX_LINE)
        return self._fh.readline(cap if limit is None or limit < 0 else min(limit, cap))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()


def read_into(path: Path, fd: int, span: Span, start: int, out: memoryview) -> None:
    """Fill ``out`` with the bytes of ``span`` from ``start`` on (positional reads: thread-safe)."""
    if start < 0 or start + len(out) > span.nbytes:
        raise CheckpointError(f"{where(path)}: a read of {len(out)} bytes at {start} outside a storage of {span.nbytes}")
    done = 0
    while done < len(out):
        got = os.preadv(fd, [out[done:]], span.offset + start + done)
        if got <= 0:
            raise CheckpointError(f"{where(path)}: file ends inside a storage (it changed while being read?)")
        done += got
