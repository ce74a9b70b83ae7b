"""The state dict of a module read inertly: its tensors named as ``module.state_dict()`` names them.

A pickled ``nn.Module`` is a record whose state holds ``_parameters``, ``_buffers`` (minus the
names in ``_non_persistent_buffers_set``) and ``_modules``; ``state_dict()`` lists each
module's parameters, then its persistent buffers, then each submodule under ``name.``,
skipping ``None`` entries. The same walk here, over :class:`~tvq.io.torch_pickle.Inert`
records, without the module's class. Shared tensors keep every name (as ``state_dict`` does);
a module graph with a cycle, or one that would name more than ``MAX_KEYS`` tensors, is refused.

A file that is a state dict, or nests one (``{"model": sd, "epoch": 3}``), gives the same keys
as the ``weights_only`` path in :mod:`tvq.io.readers`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tvq.errors import CheckpointError, where
from tvq.io.checkpoint_base import check_tensor_name, wrapped_model
from tvq.io.torch_pickle import Inert, TensorRef

MAX_KEYS = 1_000_000
MAX_DEPTH = 512


def module_state(obj: Any) -> dict[str, Any] | None:
    """The state of a pickled module (a record with ``_parameters``, ``_buffers``, ``_modules``), else None."""
    if not isinstance(obj, Inert):
        return None
    state = obj.state
    if isinstance(state, dict) and all(isinstance(state.get(k), Mapping) for k in ("_parameters", "_buffers", "_modules")):
        return state
    return None


def state_dict_refs(root: Any, file: Path) -> dict[str, TensorRef]:
    """The tensors of a module (walked), a state dict, or one nested under a usual key."""
    if module_state(root) is not None:
        return _checked(file, _walk(root, file))
    if not isinstance(root, Mapping):
        what = root.qualname if isinstance(root, Inert) else type(root).__name__
        raise CheckpointError(f"{where(file)}: holds a {what}, neither a module nor a state dict")
    tensors = _tensors_of(root)
    if not tensors:
        inner = wrapped_model(root, file, lambda v: module_state(v) is not None or (isinstance(v, Mapping) and bool(_tensors_of(v))))
        tensors = _walk(inner, file) if module_state(inner) is not None else _tensors_of(inner)
    return _checked(file, tensors)


def _tensors_of(state: Mapping[Any, Any]) -> dict[str, TensorRef]:
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, TensorRef)}


def _checked(file: Path, tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    for key in tensors:
        check_tensor_name(file, key)
    return tensors


def _walk(root: Inert, file: Path) -> dict[str, TensorRef]:
    """``state_dict()`` of a module record, depth first as torch walks it (iteratively)."""
    out: dict[str, TensorRef] = {}
    stack: list[tuple[Any, str, tuple[int, ...]]] = [(root, "", ())]
    visits = 0
    while stack:
        module, prefix, path = stack.pop()
        visits += 1
        if visits > MAX_KEYS:  # a module shared at every level names exponentially many paths
            raise CheckpointError(f"{where(file)}: names more than {MAX_KEYS} submodules")
        state = module_state(module)
        if state is None:
            what = module.qualname if isinstance(module, Inert) else type(module).__name__
            raise CheckpointError(f"{where(file, prefix.rstrip('.'))}: a submodule that is a {what}, not a module")
        if id(module) in path:
            raise CheckpointError(f"{where(file, prefix.rstrip('.'))}: the module contains itself (a cycle)")
        if len(path) > MAX_DEPTH:
            raise CheckpointError(f"{where(file, prefix.rstrip('.')[:200])}: modules nested more than {MAX_DEPTH} deep")
        skip = state.get("_non_persistent_buffers_set") or ()
        skip = set(skip) if isinstance(skip, (set, frozenset, list, tuple)) else set()
        for kind, entries in (("parameter", state["_parameters"]), ("buffer", state["_buffers"])):
            for name, value in entries.items():
                if value is None or (kind == "buffer" and name in skip):
                    continue
                key = f"{prefix}{name}"
                if not isinstance(name, str) or not isinstance(value, TensorRef):
                    what = value.qualname if isinstance(value, Inert) else type(value).__name__
                    raise CheckpointError(f"{where(file, str(key)[:200])}: a {kind} that is a {what}, not a tensor torch.save writes plainly")
                out[key] = value
                if len(out) > MAX_KEYS:
                    raise CheckpointError(f"{where(file)}: names more than {MAX_KEYS} tensors")
        children = [(f"{prefix}{name}.", sub) for name, sub in state["_modules"].items() if sub is not None]
        for child_prefix, sub in reversed(children):
            if not isinstance(child_prefix, str):
                raise CheckpointError(f"{where(file, prefix)}: a submodule name that is not a string")
            stack.append((sub, child_prefix, (*path, id(module))))
    return out


def tensor_problem(ref: TensorRef, storage_numel: int, cap: int) -> str | None:
    """Why ``ref``'s geometry does not fit its storage (None when it does): sizes and strides
    non-negative, at most ``cap`` elements, every element inside the storage."""
    if ref.offset < 0 or any(s < 0 for s in ref.shape) or any(s < 0 for s in ref.stride):
        return f"negative offset, size or stride (offset {ref.offset}, size {list(ref.shape)}, stride {list(ref.stride)})"
    numel = math.prod(ref.shape)
    if numel > cap:
        return f"{numel} elements, more than the cap of {cap} (TVQ_MAX_TENSOR_ELEMENTS)"
    if ref.dtype != ref.storage.dtype and ref.storage.dtype.itemsize != 1:
        return f"a {ref.dtype} tensor over a {ref.storage.dtype} storage"
    if numel == 0:
        return None
    per = ref.dtype.itemsize // ref.storage.dtype.itemsize if ref.dtype != ref.storage.dtype else 1
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if (last + 1) * per > storage_numel:
        shown = f"size {list(ref.shape)}, stride {list(ref.stride)}, offset {ref.offset}"
        return f"elements up to {last} of a storage of {storage_numel // per} ({shown})"
    return None
