"""The pack manifest: a versioned, self-checking JSON description of a pack's contents.

See docs/pack-format.md for the full specification.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from tvq.errors import PackError

FORMAT_NAME = "tvq-pack"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def manifest_checksum(body: dict) -> str:
    """The manifest's own ``digest``: sha256 of its JSON without that field, keys sorted."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Strict(BaseModel):
    """Unknown fields are refused and types are exact (JSON ``true`` is not ``bits = 1``);
    the deeper checks a stranger's manifest needs live in tvq.pack.validate."""

    model_config = ConfigDict(extra="forbid", strict=True)


class AuxEntry(_Strict):
    """A per-group parameter array stored next to the codes as ``<tensor>::<name>``."""

    nbytes: int
    sha256: str


class TensorEntry(_Strict):
    """One stored tensor. ``q``: packed codes; ``raw``: stored as is; ``const``: no data."""

    kind: Literal["q", "raw", "const"]
    shape: list[int]
    dtype: str  # dtype of the stored array (raw) or of the reconstruction (q/const: float32)
    bits: int | None = None
    scheme: str | None = None  # quantizer of a ``q`` tensor (see tvq.quant.schemes)
    params: dict[str, float] = {}  # its scalar parameters, e.g. scale and zero_point
    aux: dict[str, AuxEntry] = {}
    value: float | None = None
    nbytes: int = 0  # bytes of the packed codes or raw data, aux arrays excluded
    sha256: str | None = None

    @property
    def stored_bytes(self) -> int:
        return self.nbytes + sum(a.nbytes for a in self.aux.values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class FileEntry(_Strict):
    bytes: int
    sha256: str
    tensors: dict[str, TensorEntry]


class Method(_Strict):
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


class TaskEntry(_Strict):
    name: str
    file: str
    source: InputRef
    rel_error: float | None = None
    # RTVQ offsets are measured against θ_avg ("avg") or θ_pre + deq(Q(β)) ("quantized_base",
    # error correction, and every task added to an existing pack); None for TVQ/FQ.
    reference: Literal["avg", "quantized_base"] | None = None


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
        self.digest = self.compute_digest()
        return json.dumps(self.model_dump(mode="json"), indent=1)

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
