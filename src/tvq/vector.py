"""TaskVector: a lazy name -> fp32 tensor mapping with arithmetic.

Modelled on mlfoundations/task_vectors, but lazy: each tensor is produced on access from
its source (two checkpoints, a pack, or an arithmetic expression), so a task vector of a
70B model costs nothing until a tensor is asked for, and then only that tensor. A task
vector is a value and nothing else: where it was read from, what reading it costs and
whether it has codes is the merge engine's business (``tvq.merge.source.TaskInput``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from tvq.errors import CheckpointError, where
from tvq.io.readers import CheckpointReader, as_reader, float_keys
from tvq.io.tied import align_ties

Getter = Callable[[str], torch.Tensor]


class TaskVector(Mapping[str, torch.Tensor]):
    """τ = θ_finetuned − θ_pretrained, tensor by tensor, computed when read."""

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
        pre = as_reader(pretrained, unsafe_pickle)
        ft = as_reader(finetuned, unsafe_pickle)
        check_compatible(pre, ft)
        return cls(float_keys(pre), lambda k: ft.get(k).float() - pre.get(k).float(), name)

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

    @torch.no_grad()
    def apply_to(self, module: nn.Module, scale: float = 1.0) -> nn.Module:
        """θ ← θ + scale·τ in place, for every parameter or buffer of ``module`` that τ names
        (by its ``state_dict`` name), one tensor at a time; returns ``module``.

        Each tensor is computed as ``(θ.float() + scale·τ).to(θ.dtype)`` on θ's device: the
        same bytes as adding to the state dict and loading it. A tensor tied under several
        names (shared embeddings) is updated once, from its first name; tensors τ does not
        name are left as they are. A name the module lacks and a non-float tensor are refused
        before anything changes; a shape that differs when that tensor is read."""
        targets: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
        targets.update(module.named_buffers(remove_duplicate=False))
        for key in self._keys:
            target = targets.get(key)
            if target is None:
                raise CheckpointError(f"task vector {self.name!r}: tensor '{key}' is not a parameter or buffer of the module")
            if not target.is_floating_point():
                raise CheckpointError(f"task vector {self.name!r}: tensor '{key}' is {target.dtype} in the module, not a float tensor")
        done: set[int] = set()
        for key in self._keys:
            target = targets[key]
            if id(target) in done:
                continue
            done.add(id(target))
            tau = self[key]
            if tau.shape != target.shape:
                raise CheckpointError(
                    f"task vector {self.name!r}: tensor '{key}' has shape {list(tau.shape)}, the module's {list(target.shape)}"
                )
            update = (tau.float() if scale == 1.0 else scale * tau.float()).to(target.device)
            if target.dtype == torch.float32:
                target.add_(update)
            else:
                target.copy_(target.float().add_(update))  # fp32 arithmetic, then one rounding to θ's dtype
        return module


def check_compatible(pretrained: CheckpointReader, other: CheckpointReader) -> None:
    """Same float keys and shapes in both checkpoints, or one clear error naming the tensor.
    A tensor that is float in one and not in the other is named as such, not as missing.
    Tied weights stored once in one and under every name in the other are first aligned:
    ``other`` then lists them as ``pretrained`` does (``tvq.io.tied.align_ties``)."""
    align_ties(pretrained, other)
    pre_keys = set(float_keys(pretrained))
    other_keys = set(float_keys(other))
    in_both = set(pretrained.keys()) & set(other.keys())
    for key in sorted((pre_keys ^ other_keys) & in_both)[:1]:
        theirs, ours = (str(r.meta(key).dtype).removeprefix("torch.") for r in (other, pretrained))
        raise CheckpointError(f"{where(other.path, key)}: dtype differs ({theirs} vs {ours}) from the pretrained model {pretrained.path}")
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
