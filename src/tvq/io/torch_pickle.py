"""A restricted unpickler for torch files: reads a pickle program without running its code.

A ``torch.save(module)`` file is a pickle program that names classes (``src.modeling.
ImageEncoder``, ``open_clip.model.CLIP``...) and calls functions while it loads. Here no name
in the file is ever imported or called. Every ``GLOBAL`` is looked up in a small table of
values this module defines itself:

* tensor and parameter rebuilds (``torch._utils._rebuild_tensor_v2`` and friends, as torch's
  own ``weights_only`` unpickler allows them) become :class:`TensorRef` records: a storage, an
  offset, a shape and strides, nothing read yet;
* storages (persistent ids ``('storage', type, key, location, numel)``) become
  :class:`StorageRef` records;
* ``collections.OrderedDict``, ``set``, ``frozenset``, ``torch.Size``, dtypes, devices and
  ``_codecs.encode`` (how protocol 2 spells bytes) give plain Python values;
* every other name becomes an inert placeholder type: "calling" it (``REDUCE``, ``NEWOBJ``)
  makes an :class:`Inert` record of the name and the arguments, and ``BUILD`` /
  ``__setstate__`` / list and dict items are recorded on it. Nothing of the class runs.

Names that only serve to run code (``os.system``, ``builtins.eval``, ``subprocess``...) are
refused outright: a model file has no use for them (docs/security.md).
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

MAX_NAME = 256  # characters of a module or class name in a GLOBAL
# Modules (and their submodules) whose names serve only to run code or touch the system.
BLOCKED_MODULES = frozenset(
    {
        "os", "posix", "nt", "subprocess", "sys", "importlib", "runpy", "pty", "socket", "shutil", "ctypes",
        "pickle", "_pickle", "marshal", "code", "codeop", "webbrowser", "multiprocessing", "asyncio", "signal",
        "pdb", "commands", "_posixsubprocess",
    }
)  # fmt: skip
BLOCKED_BUILTINS = frozenset(
    {"eval", "exec", "compile", "__import__", "open", "breakpoint", "input", "globals", "locals", "vars", "setattr",
     "delattr", "exit", "quit", "help", "memoryview"}
)  # fmt: skip
# Storage classes by name (``torch.FloatStorage``) -> the dtype of their elements.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}  # fmt: skip
_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64",
)  # fmt: skip


class PickleRefused(Exception):
    """The program names something a model file has no use for (one line: what it names)."""


@dataclass(frozen=True)
class StorageRef:
    """A storage the program refers to: its key in the archive (``data/<key>``), element type,
    element count as the program claims it, and the device it was saved from."""

    key: str
    dtype: torch.dtype
    numel: int
    location: str


@dataclass
class TensorRef:
    """A tensor as the program describes it; its bytes stay in the archive until read."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    extra: list[Any] = field(default_factory=list)  # state a BUILD tried to set: recorded, never applied

    def __setstate__(self, state: Any) -> None:
        self.extra.append(state)


class Inert:
    """What an unknown class or function becomes when the program "calls" it: its name and
    arguments, and whatever ``BUILD``, ``APPEND`` or ``SETITEM`` tried to give it."""

    module: str = ""
    name: str = ""
    _record: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        self = object.__new__(cls)
        self.__dict__["_record"] = {"args": args, "kwargs": kwargs, "state": None, "items": [], "entries": {}}
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self._record["state"] = state

    def append(self, item: Any) -> None:
        self._record["items"].append(item)

    def extend(self, items: Any) -> None:
        self._record["items"].extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._record["entries"][key] = value

    def __setattr__(self, name: str, value: Any) -> None:  # BUILD's slot state lands here
        self._record.setdefault("attrs", {})[name] = value

    @property
    def args(self) -> tuple[Any, ...]:
        return self._record["args"]

    @property
    def state(self) -> Any:
        """The instance state: what ``BUILD`` gave (a dict for modules), or None."""
        state = self._record["state"]
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            return state[0]  # (dict state, slot state)
        return state

    @property
    def qualname(self) -> str:
        return f"{type(self).module}.{type(self).name}"

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


def _storage_dtype(module: str, name: str) -> torch.dtype | None:
    if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
        return _STORAGE_DTYPES[name]
    return None


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise pickle.UnpicklingError(f"tensor {what} is not a tuple of integers")
    return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    if type(offset) is not int:
        raise pickle.UnpicklingError("tensor storage offset is not an integer")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise pickle.UnpicklingError(f"tensor of {len(shape)} dimensions with {len(strides)} strides")
    return TensorRef(storage, offset, shape, strides, dtype or storage.dtype)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
    """``_rebuild_tensor`` and ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    backward_hooks, metadata=None)``: the storage's dtype is the tensor's."""
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, *_: Any) -> TensorRef:
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("_rebuild_tensor_v3 without a dtype")
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """A Parameter is its tensor here (``requires_grad`` and hooks do not matter to weights)."""
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """Tensor subclasses and tensors with attributes: the tensor the inner rebuild gives."""
    if not (isinstance(func, Allowed) and func.fn in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)) or not isinstance(args, tuple):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 of something other than a tensor")
    return func(*args)


def _size(dims: Any = ()) -> tuple[int, ...]:
    return _ints(dims, "size")


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)[:64]


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``: protocol 2 writes bytes as latin-1 text."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than bytes spelled as latin-1")
    return text.encode("latin-1")


def _bytearray(data: Any = b"") -> bytearray:
    if not isinstance(data, (bytes, bytearray)):  # bytearray(10**12) would allocate a terabyte
        raise pickle.UnpicklingError("bytearray from something other than bytes")
    return bytearray(data)


class Allowed:
    """An allowlisted callable as the program sees it: callable, and nothing else. ``BUILD``
    on it is refused, so no program can set attributes (``__defaults__``...) on the functions
    every later load shares."""

    __slots__ = ("fn",)
    fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on an allowlisted function")

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("BUILD on an allowlisted function")


def _allowed() -> dict[tuple[str, str], Any]:
    functions: dict[tuple[str, str], Callable[..., Any]] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): _bytearray,
        ("_codecs", "encode"): _encode,
        ("torch", "Size"): _size,
        ("torch", "device"): _device,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    }
    table: dict[tuple[str, str], Any] = {key: Allowed(fn) for key, fn in functions.items()}
    for name in _DTYPE_NAMES:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            table["torch", name] = dtype
    return table


_ALLOWED = _allowed()


def blocked(module: str, name: str) -> bool:
    """Whether ``module.name`` serves only to run code (refused, not even recorded)."""
    root = module.split(".")[0]
    if root in ("builtins", "__builtin__"):
        return name in BLOCKED_BUILTINS
    return root in BLOCKED_MODULES


class RestrictedUnpickler(pickle.Unpickler):
    """Reads one pickle program; see the module docstring. ``storage`` turns a storage's
    persistent id into a :class:`StorageRef` (the archive formats differ)."""

    def __init__(self, file: BinaryIO, storage: Callable[[tuple[Any, ...]], Any]) -> None:
        super().__init__(file)
        self._storage = storage
        self._inert: dict[tuple[str, str], type[Inert]] = {}
        self.globals: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if len(module) > MAX_NAME or len(name) > MAX_NAME:
            raise pickle.UnpicklingError(f"a global name of {len(module) + len(name)} characters")
        if module == "__builtin__":
            module = "builtins"  # protocol 2 spells Python 3's builtins the Python 2 way
        self.globals.add(f"{module}.{name}")
        if blocked(module, name):
            raise PickleRefused(f"{module}.{name}")
        value = _ALLOWED.get((module, name))
        if value is not None:
            return value
        dtype = _storage_dtype(module, name)
        if dtype is not None:
            return StorageType(name, dtype)
        return self._placeholder(module, name)

    def _placeholder(self, module: str, name: str) -> type[Inert]:
        cls = self._inert.get((module, name))
        if cls is None:
            cls = type("Inert", (Inert,), {"module": module, "name": name})
            self._inert[module, name] = cls
        return cls

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module" and len(pid) >= 2:
            return pid[1]  # legacy files name a module's class this way (with its source, ignored)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:60]!r}")
        return self._storage(pid)


@dataclass(frozen=True)
class StorageType:
    """What ``torch.FloatStorage`` stands for in a storage's persistent id: a dtype."""

    name: str
    dtype: torch.dtype


def storage_ref(pid: tuple[Any, ...]) -> StorageRef:
    """``('storage', type, key, location, numel[, view_metadata])`` as a record, its fields checked."""
    if len(pid) not in (5, 6):
        raise pickle.UnpicklingError(f"storage persistent id of {len(pid)} fields")
    _, kind, key, location, numel = pid[:5]
    if len(pid) == 6 and pid[5] is not None:
        raise pickle.UnpicklingError("a storage view (torch < 0.4 files) is not supported")
    if not isinstance(kind, StorageType):
        raise pickle.UnpicklingError(f"storage of type {kind!r}")
    if not isinstance(key, str) or not 0 < len(key) <= 64 or not key.isprintable() or "/" in key or "\\" in key or key in (".", ".."):
        raise pickle.UnpicklingError(f"storage key {str(key)[:40]!r}")
    if type(numel) is not int or numel < 0:
        raise pickle.UnpicklingError(f"storage of {numel!r} elements")
    return StorageRef(key, kind.dtype, numel, str(location)[:64])


def check_opcodes(file: BinaryIO) -> None:
    """Read the program once, running nothing, before it is loaded: memo indices must be the
    pickler's own (0, 1, 2...; CPython sizes its memo table by the largest index, so one
    ``LONG_BINPUT 2**31`` would fill 32 GiB), and out-of-band buffers (protocol 5) and the
    extension registry, which no torch file uses, are refused."""
    puts = 0
    for op, arg, _ in pickletools.genops(file):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if not isinstance(arg, int) or not 0 <= arg <= puts:
                raise pickle.UnpicklingError(f"memo index {arg} after {puts} entries")
            puts += 1
        elif op.name == "MEMOIZE":
            puts += 1
        elif op.name in _REFUSED_OPCODES:
            raise pickle.UnpicklingError(f"opcode {op.name}, which no torch file uses")


_REFUSED_OPCODES = frozenset({"NEXT_BUFFER", "READONLY_BUFFER", "EXT1", "EXT2", "EXT4"})


def load_program(data: bytes | BinaryIO, storage: Callable[[tuple[Any, ...]], Any] = storage_ref, seen: set[str] | None = None) -> Any:
    """The object a pickle program describes, built inertly (see the module docstring).
    Raises :class:`PickleRefused` for names that only run code, ``pickle.UnpicklingError``
    and the other errors of a malformed program. ``seen`` collects the global names it names.
    A file is read from its position on (and left after the program's STOP)."""
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    start = file.tell()
    check_opcodes(file)
    file.seek(start)
    unpickler = RestrictedUnpickler(file, storage)
    try:
        return unpickler.load()
    finally:
        if seen is not None:
            seen.update(unpickler.globals)
