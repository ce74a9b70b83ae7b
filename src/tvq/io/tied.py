"""Names that are one tensor: weights tied under several names (a language model's input and
output embeddings, a shared submodule) that ``torch.save`` stores once and ``state_dict`` lists
under every name.

A merge treats such a group as the tensor it is: merged once, under its first name, and written
under every name (so a ``.pt`` written like the pretrained file keeps the tie, and methods whose
choices depend on the name, such as TIES's tie-break or DARE's seed, cannot give the names
different values). Safetensors files hold no shared tensors, so their readers report none.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

from tvq.io.checkpoint_base import CheckpointReader
from tvq.io.readers import MemoryReader
from tvq.io.torch_pickle_reader import TorchPickleReader


def tied_names(reader: CheckpointReader) -> dict[str, str]:
    """alias -> the first name (in the reader's order) of the same view of the same storage:
    same storage, offset, shape, strides and dtype. Overlapping but different views are not
    tied (each is its own tensor; the writer checks that they agree)."""
    first: dict[Hashable, str] = {}
    tied: dict[str, str] = {}
    for key, view in _views(reader):
        name = first.setdefault(view, key)
        if name != key:
            tied[key] = name
    return tied


def _views(reader: CheckpointReader) -> Iterator[tuple[str, Hashable]]:
    if isinstance(reader, TorchPickleReader):
        for key, ref in reader.refs.items():
            if ref.dtype.is_floating_point:
                yield key, (ref.storage.key, ref.offset, ref.shape, ref.stride, ref.dtype)
    elif isinstance(reader, MemoryReader):
        for key in reader:
            t = reader.get(key)
            if t.is_floating_point() and t.numel() > 0 and t.device.type != "meta":
                yield key, (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
