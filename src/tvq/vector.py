"""TaskVector: a lazy name -> fp32 tensor mapping with arithmetic.

Modelled on mlfoundations/task_vectors, but lazy: each tensor is produced on access from
its source (two checkpoints, a pack, or an arithmetic expression), so a task vector of a
70B model costs nothing until a tensor is asked for, and then only that tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from tvq.errors import CheckpointError, where
from tvq.io.readers import CheckpointReader, open_checkpoint

Getter = Callable[[str], torch.Tensor]


class TaskVector(Mapping[str, torch.Tensor]):
    """τ = θ_finetuned − θ_pretrained, tensor by tensor, computed when read."""

    # Set by tvq.merge.source.load_task_vectors: where τ comes from, so a remote worker can
    # reopen it ("pack" or "finetuned", path), and the input bytes one tensor costs to read.
    origin: tuple[str, str] | None = None
    nbytes: Callable[[str], int] | None = None
    coded: Callable[[str], object] | None = None  # key -> tvq.quant.coded.CodedTensor or None (packs)

    def __init__(self, keys: list[str], getter: Getter, name: str = "") -> None:
        self._keys = list(keys)
        self._key_set = set(self._keys)
        self._getter = getter
        self.name = name

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], name: str = "") -> TaskVector:
        return cls(list(tensors), lambda k: tensors[k].float().clone(), name)  # never alias the caller's tensors

    @classmethod
    def from_checkpoints(
        cls,
        pretrained: str | Path | CheckpointReader,
        finetuned: str | Path | CheckpointReader,
        name: str = "",
        unsafe_pickle: bool = False,
    ) -> TaskVector:
        """The difference of two checkpoints over their floating-point tensors."""
        pre = pretrained if hasattr(pretrained, "get") else open_checkpoint(pretrained, unsafe_pickle)
        ft = finetuned if hasattr(finetuned, "get") else open_checkpoint(finetuned, unsafe_pickle)
        check_compatible(pre, ft)
        keys = [k for k in pre.keys() if pre.meta(k).is_float]
        return cls(keys, lambda k: ft.get(k).float() - pre.get(k).float(), name)

    # -- mapping ------------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._getter(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    # -- arithmetic (lazy) --------------------------------------------------------------
    def _combine(self, other: TaskVector, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> TaskVector:
        if self._key_set != other._key_set:
            missing = sorted(self._key_set ^ other._key_set)[0]
            raise CheckpointError(f"task vectors {self.name!r} and {other.name!r} differ at tensor '{missing}'")
        return TaskVector(self._keys, lambda k: op(self[k], other[k]))

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._combine(other, torch.add)

    def __radd__(self, other: object) -> TaskVector:
        if other == 0:  # lets sum([...]) work
            return self
        return NotImplemented

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._combine(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return TaskVector(self._keys, lambda k: -self[k])

    def __mul__(self, scale: float) -> TaskVector:
        return TaskVector(self._keys, lambda k: self[k] * scale)

    __rmul__ = __mul__

    # -- use ----------------------------------------------------------------------------
    def materialize(self) -> dict[str, torch.Tensor]:
        """All tensors in memory (only for small models or tests)."""
        return {k: self[k] for k in self._keys}

    def norm(self) -> float:
        """L2 norm over all tensors, computed one tensor at a time."""
        return float(sum(float(self[k].double().pow(2).sum()) for k in self._keys) ** 0.5)

    def apply_to(self, pretrained: CheckpointReader, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """θ_pre + scale·τ for every tensor of the pretrained model, in its own dtypes."""
        out = {}
        for key in pretrained.keys():
            base = pretrained.get(key)
            out[key] = (base.float() + scale * self[key]).to(base.dtype) if key in self._key_set else base
        return out


def check_compatible(pretrained: CheckpointReader, other: CheckpointReader) -> None:
    """Same float keys and shapes in both checkpoints, or one clear error naming the tensor.
    A tensor that is float in one and not in the other is named as such, not as missing."""
    pre_keys = {k for k in pretrained.keys() if pretrained.meta(k).is_float}
    other_keys = {k for k in other.keys() if other.meta(k).is_float}
    in_both = set(pretrained.keys()) & set(other.keys())
    for key in sorted((pre_keys ^ other_keys) & in_both)[:1]:
        a, b = (str(r.meta(key).dtype).removeprefix("torch.") for r in (pretrained, other))
        raise CheckpointError(f"{where(other.path, key)}: dtype differs ({b} vs {a}) from the pretrained model {pretrained.path}")
    for key in sorted(pre_keys - other_keys)[:1]:
        raise CheckpointError(f"{where(other.path, key)}: missing (present in the pretrained model {pretrained.path})")
    for key in sorted(other_keys - pre_keys)[:1]:
        raise CheckpointError(f"{where(other.path, key)}: not in the pretrained model {pretrained.path}")
    for key in pre_keys:
        a, b = pretrained.meta(key).shape, other.meta(key).shape
        if a != b:
            raise CheckpointError(
                f"{where(other.path, key)}: shape {list(b)} differs from the pretrained model's {list(a)}"
            )
