"""The pack manifest: a versioned, self-checking JSON description of a pack's contents.

See docs/pack-format.md for the full specification.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, ClassVar, Final, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from tvq.errors import PackError

FORMAT_NAME: Final = "tvq-pack"
# 4: entropy-coded raw tensors; 3: entropy-coded codes (issue 15); 2: tasks[].rel_error_quantized
# (issue 14); 1-3 still read
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
CODES_VERSION = 3  # what a pack whose coded tensors are all codes is written as: readable by tvq before version 4
PLAIN_VERSION = 2  # what a pack without entropy-coded tensors is written as: readable by tvq before version 3
MANIFEST_NAME = "manifest.json"


def manifest_checksum(body: dict) -> str:
    """The manifest's own ``digest``: sha256 of its JSON without that field, keys sorted."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def aux_key(key: str, name: str) -> str:
    """The name a pack file stores the aux array ``name`` of tensor ``key`` under."""
    return f"{key}::{name}"


def announced_names(keys: list[str], quantized: set[str], aux_names: tuple[str, ...]) -> list[str]:
    """Every tensor name a pack file may hold: the keys, plus aux arrays of quantized ones."""
    return [*keys, *(aux_key(k, a) for k in keys if k in quantized for a in aux_names)]


class _Strict(BaseModel):
    """Unknown fields are refused and types are exact (JSON ``true`` is not ``bits = 1``);
    the deeper checks a stranger's manifest needs live in tvq.pack.validate."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _OmitsAbsent(_Strict):
    """A model with fields newer versions added: each of ``OPTIONAL`` is left out of the JSON when
    None, so what older tvq writes stays byte for byte what it wrote."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _optional_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        for name in self.OPTIONAL:
            if out.get(name) is None:
                out.pop(name, None)
        return out


class EntropyEntry(_OmitsAbsent):
    """How a tensor is entropy-coded (tvq.quant.entropy): a ``q`` tensor's codes laid out
    byte-aligned (no ``filter``), or a ``raw`` tensor's bytes (``filter: "bitshuffle"``, version
    4), cut into blocks of ``block`` bytes, each one zstd frame of ``blocks[i]`` bytes (their sum
    is the entry's ``nbytes``, the bytes on disk)."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("filter",)

    coder: Literal["zstd"]
    filter: Literal["bitshuffle"] | None = None  # raw tensors only; left out of the JSON when absent (codes, version 3)
    block: int
    blocks: list[int]


class AuxEntry(_Strict):
    """A per-group parameter array stored next to the codes as ``<tensor>::<name>``."""

    nbytes: int
    sha256: str


# Version 1 writes every tensor entry with these ten keys, in this order, whatever its kind;
# the keys a kind does not use hold fixed values (a raw tensor's ``"bits": null``). Each kind
# below has only its own fields: the others are checked and dropped when read and written
# back when dumped, so manifests on disk and their digests are those of version 1.
ENTRY_KEYS = ("kind", "shape", "dtype", "bits", "scheme", "params", "aux", "value", "nbytes", "sha256")


class _Entry(_Strict):
    """What every kind of stored tensor has: its shape."""

    UNUSED: ClassVar[dict[str, Any]]  # key -> the JSON value version 1 writes for it
    UNUSED_PROBLEM: ClassVar[str]  # why another value is refused

    shape: list[int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_bytes(self) -> int:
        """Bytes this tensor takes in its pack file (aux arrays included)."""
        return 0

    @model_validator(mode="before")
    @classmethod
    def _drop_unused(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unused = cls.UNUSED
        own = {k: v for k, v in data.items() if k not in unused}
        if len(own) < len(data):
            for key, fixed in unused.items():
                if key in data and (data[key] != fixed or type(data[key]) is not type(fixed)):
                    raise ValueError(cls.UNUSED_PROBLEM)
        return own

    @model_serializer(mode="wrap")
    def _version1_layout(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        own = handler(self)
        unused = self.UNUSED
        out = {key: own[key] if key in own else _copy(unused[key]) for key in ENTRY_KEYS if key in own or key in unused}
        if own.get("entropy") is not None:  # entropy-coded entries only (versions 3, 4): others keep version 1's keys
            out["entropy"] = own["entropy"]
        return out


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


class QuantizedEntry(_Entry):
    """``q``: ``bits``-bit codes, bit-packed (``nbytes``), decoded to float32 by ``scheme``
    (see tvq.quant.schemes) with its scalar ``params`` (e.g. scale and zero_point) and, for
    group-wise schemes, per-group ``aux`` arrays stored beside the codes."""

    UNUSED: ClassVar[dict[str, Any]] = {"dtype": "float32", "value": None}
    UNUSED_PROBLEM: ClassVar[str] = "codes decode to float32 and carry no value"

    kind: Literal["q"] = "q"
    bits: int
    scheme: str
    params: dict[str, float] = {}
    aux: dict[str, AuxEntry] = {}
    nbytes: int  # of the codes as stored (packed, or entropy-coded), aux arrays excluded
    sha256: str  # of those bytes on disk
    entropy: EntropyEntry | None = None  # set when the codes are entropy-coded (version 3)

    @property
    def stored_bytes(self) -> int:
        return self.nbytes + sum(a.nbytes for a in self.aux.values())

    @property
    def aux_numel(self) -> int:
        """Elements of each aux array: one per group of ``params["group_size"]`` elements."""
        size = int(self.params.get("group_size", 1))
        return -(-self.numel // size)


class RawEntry(_Entry):
    """``raw``: the tensor stored exactly, in ``dtype`` (kept tensors: biases, norms; FQ's
    originals): as is, or entropy-coded (``entropy``, version 4: a ``U8`` array of ``nbytes``
    coded bytes that decodes to the tensor's own bytes)."""

    UNUSED: ClassVar[dict[str, Any]] = {"bits": None, "scheme": None, "params": {}, "aux": {}, "value": None}
    UNUSED_PROBLEM: ClassVar[str] = "a raw tensor has no bits, scheme, parameters or value"

    kind: Literal["raw"] = "raw"
    dtype: str  # torch's name: "float32", "bfloat16", ...
    nbytes: int  # as stored: numel x itemsize, or the coded bytes
    sha256: str  # of those bytes on disk
    entropy: EntropyEntry | None = None  # set when the bytes are entropy-coded (version 4)

    @property
    def stored_bytes(self) -> int:
        return self.nbytes


class ConstEntry(_Entry):
    """``const``: every element is ``value`` (float32); nothing is stored. ``bits`` is the
    width the tensor was given (kept so that adding tasks allocates as before)."""

    UNUSED: ClassVar[dict[str, Any]] = {"dtype": "float32", "scheme": None, "params": {}, "aux": {}, "nbytes": 0, "sha256": None}
    UNUSED_PROBLEM: ClassVar[str] = "a constant stores no data, parameters or checksum and decodes to float32"

    kind: Literal["const"] = "const"
    bits: int | None = None
    value: float

    @field_validator("value", mode="before")
    @classmethod
    def _value_given(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("a constant needs a finite float32 value, got None")
        return value


TensorEntry: TypeAlias = Annotated[QuantizedEntry | RawEntry | ConstEntry, Field(discriminator="kind")]
"""One stored tensor, by its ``kind``: packed codes, stored as is, or a constant."""


def written_version(files: dict[str, FileEntry]) -> int:
    """The format version a pack of these files is written as: 4 when a raw tensor is
    entropy-coded, 3 when only codes are, otherwise 2, so a pack reads in every tvq that can
    read what it holds (one made with entropy coding off in tvq before version 3)."""
    entries = [e for f in files.values() for e in f.tensors.values() if isinstance(e, (QuantizedEntry, RawEntry)) and e.entropy is not None]
    if any(isinstance(e, RawEntry) for e in entries):
        return FORMAT_VERSION
    return CODES_VERSION if entries else PLAIN_VERSION


def entropy_coded(files: dict[str, FileEntry]) -> bool:
    """Whether any tensor of these files is entropy-coded (codes or raw)."""
    return any(isinstance(e, (QuantizedEntry, RawEntry)) and e.entropy is not None for f in files.values() for e in f.tensors.values())


class FileEntry(_Strict):
    bytes: int
    sha256: str
    tensors: dict[str, TensorEntry]


class Method(_OmitsAbsent):
    """How the pack was made: the paper's four loaders map onto target + residual."""

    target: Literal["task_vector", "finetuned"]
    residual: bool = False
    bits: int
    base_bits: int | None = None
    error_correction: bool = False
    quantizer: str = "minmax"
    group_size: int | None = None
    key_rule: Literal["ndim", "paper"] = "ndim"
    budget_bits: float | None = None  # set when bits were allocated per tensor under a budget
    # how (tvq.encode.budget): on the fixed scheme of ``anchor_bits`` plus upgrades, or free per
    # tensor. Optional (older packs lack them) and left out of the JSON when absent, as rel_error_quantized
    allocation: Literal["anchored", "free"] | None = None
    anchor_bits: int | None = None
    OPTIONAL: ClassVar[tuple[str, ...]] = ("allocation", "anchor_bits")

    @property
    def label(self) -> str:
        q = "" if self.quantizer == "minmax" else f" [{self.quantizer}{self.group_size or ''}]"
        if self.budget_bits is not None:
            q += f" budget {self.budget_bits:g} bits"
        if self.residual:
            ec = "+EC" if self.error_correction else ""
            return f"RTVQ B{self.base_bits}O{self.bits}{ec}{q}"
        return f"{'FQ' if self.target == 'finetuned' else 'TVQ'} INT{self.bits}{q}"


class InputRef(_Strict):
    path: str
    digest: str = Field(
        pattern=r"^(blake3:)?[0-9a-f]{64}$",  # tvq.io.content_hash: labelled BLAKE3, or bare sha256 (older packs)
        description="hash over (key, dtype, shape, hash of the bytes) of the float tensors, keys sorted",
    )
    fp32_bytes: int


class TaskEntry(_OmitsAbsent):
    name: str
    file: str
    source: InputRef
    rel_error: float | None = None  # ‖τ̂ − τ‖ / ‖τ‖ over every stored tensor (exact ones included)
    # The same over the quantized tensors only (not diluted by exactly stored biases, norms and
    # running statistics). Optional (older packs lack it) and left out of the JSON when absent, so
    # manifests of older packs read, re-serialise and verify as they were written.
    rel_error_quantized: float | None = None
    # RTVQ offsets are measured against θ_avg ("avg") or θ_pre + deq(Q(β)) ("quantized_base",
    # error correction, and every task added to an existing pack); None for TVQ/FQ.
    reference: Literal["avg", "quantized_base"] | None = None

    OPTIONAL: ClassVar[tuple[str, ...]] = ("rel_error_quantized",)


class Manifest(_Strict):
    format: Literal["tvq-pack"] = FORMAT_NAME
    version: int = FORMAT_VERSION
    created_by: str
    method: Method
    pretrained: InputRef
    tasks: list[TaskEntry]
    base_file: str | None = None
    skipped: list[str] = []
    files: dict[str, FileEntry]
    digest: str = ""
    _index: tuple[tuple[int, int], dict[str, TaskEntry]] | None = PrivateAttr(default=None)

    def compute_digest(self) -> str:
        return manifest_checksum(self.model_dump(mode="json", exclude={"digest"}))

    def to_json(self) -> str:
        """The manifest as written: compact JSON (every reader parses it; the digest never covered
        the layout), one line per task file and per tensor so that it still diffs and greps."""
        self.digest = self.compute_digest()
        return _lines(self.model_dump(mode="json"))

    def task(self, name: str) -> TaskEntry:
        entry = self._task_index().get(name)
        if entry is None:
            raise PackError(f"no task {name!r} in this pack; tasks: {', '.join(t.name for t in self.tasks)}")
        return entry

    def _task_index(self) -> dict[str, TaskEntry]:
        """name -> entry, rebuilt when the task list changes (one lookup per tensor read)."""
        stamp = (id(self.tasks), len(self.tasks))
        if self._index is None or self._index[0] != stamp:
            self._index = (stamp, {t.name: t for t in self.tasks})
        return self._index[1]


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _lines(body: dict[str, Any]) -> str:
    """Compact JSON with a line break before each top-level field, task, file and tensor entry
    (whitespace between tokens: the same JSON value). Indenting every key, as tvq did before,
    took 30 % of the manifest: about 0.01 bits per trained parameter on the text benchmark."""
    out = []
    for key, value in body.items():
        if key == "files" and isinstance(value, dict):
            files = []
            for rel, entry in value.items():
                tensors = ",\n  ".join(f"{_compact(k)}:{_compact(t)}" for k, t in entry["tensors"].items())
                head = _compact({k: v for k, v in entry.items() if k != "tensors"})[:-1]
                files.append(f'{_compact(rel)}:{head},"tensors":{{\n  {tensors}}}}}' if tensors else f"{_compact(rel)}:{_compact(entry)}")
            text = "{\n " + ",\n ".join(files) + "}" if files else "{}"
        elif key == "tasks" and isinstance(value, list) and value:
            text = "[\n " + ",\n ".join(_compact(t) for t in value) + "]"
        else:
            text = _compact(value)
        out.append(f"{_compact(key)}:{text}")
    return "{\n" + ",\n".join(out) + "\n}\n"
