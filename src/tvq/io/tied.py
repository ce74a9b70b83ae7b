"""Names that are one tensor: weights tied under several names (a language model's input and
output embeddings, a shared submodule) that ``torch.save`` stores once and ``state_dict`` lists
under every name.

A merge treats such a group as the tensor it is: merged once, under its first name, and written
under every name (so a ``.pt`` written like the pretrained file keeps the tie, and methods whose
choices depend on the name, such as TIES's tie-break or DARE's seed, cannot give the names
different values). Safetensors files hold no shared tensors, so their readers report none,
and a checkpoint that stores a tie once is read beside one that lists it twice as if it did too
(``align_ties``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

from tvq.io.checkpoint_base import CheckpointReader, ReaderBase
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


def align_ties(pretrained: CheckpointReader, other: CheckpointReader) -> None:
    """Let ``other`` list exactly the tied names ``pretrained`` lists where one of them stores a tie
    once (Hugging Face's safetensors keep only the first name; ``torch.save`` lists every name):
    a name tied in ``pretrained`` that ``other`` lacks reads as its first name there; a name tied
    in ``other`` that ``pretrained`` lacks is left out of ``other``. Anything else is as stored."""
    if not isinstance(other, ReaderBase):
        return
    names = set(other.keys())
    for alias, first in tied_names(pretrained).items():
        if alias not in names and first in names:
            other.share(alias, first)
    ours = set(pretrained.keys())
    for alias, first in tied_names(other).items():
        if alias not in ours and first in ours:
            other.hide(alias)
