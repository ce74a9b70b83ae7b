"""Merging a large tensor a block of elements at a time: a working set independent of T and
of the largest tensor.

A method that merges by blocks (``MergeMethod.merges_by_blocks``: an elementwise method, whose
merged element depends only on that element's T values, or one whose per-tensor statistics
are computed first, exactly, from passes over the blocks: TIES's cut-offs and majority sign,
``MergeMethod.block_merger``) gets ``[T, n]`` flat blocks of ``block`` elements in order,
each with the flat index of its first element; each task's block is read alone (packs decode
only the codes, or the zstd frames, covering it: ``Pack.task_blocks``; safetensors
checkpoints read only its bytes: ``CheckpointBlocks``), merged (from codes where the method
and the inputs allow, as a whole tensor would be), added to θ_pre's block, cast, and handed
to the writer as one piece of the output tensor (``Chunked``). The same fp32 operations run
on every element as on the whole tensor, so the output bytes are the same; the working set
is about (T + 3) blocks of fp32 whatever the tensor's size (a pre-pass reads the inputs
again, one block at a time; whole-model pre-passes, global TIES's, stream the same way:
``model_blocks``). Tensors no larger than a block, methods that need the whole tensor, and
inputs that cannot be read by blocks (in-memory task vectors, pickled modules, group-wise
schemes, transformed sources) take the whole-tensor path. Outputs take the pieces as they come
(safetensors files and ``.pt`` files written like the pretrained one alike).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from tqdm import tqdm

from tvq import heap
from tvq.device import on_host
from tvq.errors import TvqError
from tvq.execute import memory_limit
from tvq.io.readers import MemoryReader, SafetensorsReader, element_reader
from tvq.merge.registry import BlockMerger, BlockPasses, MergeMethod
from tvq.merge.source import BlockReader, TaskSource
from tvq.pack.blocks import ALIGN, values
from tvq.quant.coded import CodedTensor

BLOCK_ELEMENTS = 1 << 22  # elements per block: 16 MiB per task in fp32
BLOCK_SHARE = 8  # a block's working set: at most 1/8 of the memory limit (the executor's budget is 1/4)
MIN_BLOCK_ELEMENTS = 1 << 16  # blocks shrink to fit a memory limit down to this
DEVICE_MIN_ELEMENTS = 1 << 16  # on a GPU, tensors larger than this merge there (as one block when no larger than a block)
_EXACT = (torch.bfloat16, torch.float16, torch.float32)  # convert to fp32 exactly inside add_


@dataclass
class Chunked:
    """One output tensor as consecutive flat pieces, in order (the writer appends them)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: Iterator[torch.Tensor]


def block_elements(block: int | None = None, tasks: int = 0) -> int:
    """Elements per block: ``block``, else ``BLOCK_ELEMENTS`` (read now: tests set it), fewer
    under a memory limit when a block of ``tasks`` tasks would hold more than ``BLOCK_SHARE``
    of it (a block's working set is about T + 3 fp32 rows: 304 MiB for 16 tasks at 4 Mi
    elements), so the streamed tensor, the executor's jobs beside it and the process fit;
    rounded up to ``ALIGN``. The bytes merged do not depend on the block size."""
    if block is None:
        block = BLOCK_ELEMENTS
        fits = memory_limit() // BLOCK_SHARE // ((tasks + 3) * 4)
        if tasks and fits < block:
            block = max(MIN_BLOCK_ELEMENTS, 1 << (max(fits, 1).bit_length() - 1))
    return block + (-block) % ALIGN


def dense_block(readers: list[BlockReader], start: int, end: int) -> torch.Tensor:
    """Elements ``[start, end)`` of every task as one ``[T, m]`` fp32 stack (filled task by task)."""
    stack = torch.empty((len(readers), end - start))
    for i, reader in enumerate(readers):
        part = reader.read(start, end)
        stack[i] = values(part) if isinstance(part, CodedTensor) else part
    return stack


def device_stack(parts: Iterable[CodedTensor | torch.Tensor], tasks: int, m: int, device: torch.device) -> torch.Tensor:
    """Every task's part of ``m`` elements as one ``[T, m]`` fp32 stack on ``device``: codes (one
    byte per element) or values move there and decode there (a table lookup: the host's bytes)."""
    stack = torch.empty((tasks, m), device=device)
    for i, part in enumerate(parts):
        if isinstance(part, CodedTensor):
            torch.index_select(part.table.to(device), 0, part.index.to(device).to(torch.int32), out=stack[i])
        else:
            stack[i] = part
    return stack


def tensor_blocks(source: TaskSource, key: str, block: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """One pass over τ of ``key``, every task, as flat ``[T, m]`` fp32 blocks in order (first
    element, block): by blocks when the tensor is larger than a block and every input reads by
    blocks, else the whole stack as one block. Metered like ``TaskSource.stack``: a pre-pass
    over a large tensor then holds T blocks, not T copies of the tensor."""
    n, step = source.numel(key), block_elements(block, len(source.tasks))
    readers = source.blocks(key) if n > step else None
    if readers is None:
        yield 0, source.stack(key).reshape(len(source.tasks), -1)
        return
    source.count_read(key)
    for start in range(0, n, step):
        yield start, dense_block(readers, start, min(start + step, n))
        heap.release()  # what the block's reading and its user freed, back to the system (tvq.heap)


def model_blocks(
    source: TaskSource, block: int | None = None, desc: str = "", progress: bool = False, keys: Collection[str] | None = None
) -> Iterator[tuple[str, int, torch.Tensor]]:
    """One pass over every merged tensor (``source.keys``, in order; only ``keys`` when given) by
    ``tensor_blocks``: (key, first element, block), a whole-model pre-pass (``tvq.merge.ops.Stream``)."""
    names = source.keys if keys is None else [k for k in source.keys if k in keys]
    for key in tqdm(names, desc=desc, unit="tensor", disable=not progress):
        for start, part in tensor_blocks(source, key, block):
            yield key, start, part
            del part  # before the next block is read
        heap.release()


def tensor_parts(source: TaskSource, key: str, block: int | None = None) -> Iterator[tuple[int, list[CodedTensor] | torch.Tensor]]:
    """One pass over ``key`` (counted read) with the codes kept where every task's part is
    coded: (first element, every task's ``CodedTensor`` or the ``[T, m]`` fp32 block); by blocks
    when the tensor is larger than a block and every input reads by blocks, else whole."""
    n, step = source.numel(key), block_elements(block, len(source.tasks))
    readers = source.blocks(key) if n > step else None
    if readers is None:
        coded = source.coded(key)
        if coded is None:
            yield 0, source.stack(key).reshape(len(source.tasks), -1)  # metered by ``stack``
            return
        source.count_read(key)
        yield 0, coded
        return
    source.count_read(key)
    for start in range(0, n, step):
        parts = [reader.read(start, min(start + step, n)) for reader in readers]
        if all(isinstance(part, CodedTensor) for part in parts):
            yield start, [part for part in parts if isinstance(part, CodedTensor)]
        else:
            yield start, torch.stack([values(part) if isinstance(part, CodedTensor) else part for part in parts])
        del parts  # before the next block is read
        heap.release()


def model_parts(
    source: TaskSource, block: int | None = None, desc: str = "", progress: bool = False, keys: Collection[str] | None = None
) -> Iterator[tuple[str, int, list[CodedTensor] | torch.Tensor]]:
    """``model_blocks`` with the codes kept (``tensor_parts`` of every merged tensor): a pre-pass
    from code histograms then decodes no values."""
    names = source.keys if keys is None else [k for k in source.keys if k in keys]
    for key in tqdm(names, desc=desc, unit="tensor", disable=not progress):
        for start, part in tensor_parts(source, key, block):
            yield key, start, part
        heap.release()


def may_code(method: MergeMethod) -> bool:
    """Whether ``method`` merges from codes (``merge_coded``) when the inputs are coded."""
    return method.elementwise or type(method).merge_coded is not MergeMethod.merge_coded


def merged_value(key: str, delta: torch.Tensor, base: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """θ_pre + δ in fp32 (``delta`` is consumed), cast to ``dtype`` (None: θ_pre's), checked finite."""
    merged = delta.add_(base if base.dtype in _EXACT else base.float()).to(dtype or base.dtype)
    if not bool(torch.isfinite(merged.sum(dtype=torch.float32))) and not bool(torch.isfinite(merged).all()):
        raise TvqError(
            f"merged tensor '{key}' is not finite in {str(merged.dtype).removeprefix('torch.')} "
            "(NaN or Inf): check the scaling coefficients and the output dtype"
        )  # nothing tvq writes decodes to NaN/Inf; the sum is the cheap test, the exact one runs on failure
    return merged


@dataclass
class BlockMerge:
    """The tensors of one merge that stream by blocks, and their merged pieces."""

    method: MergeMethod
    source: TaskSource
    block: int | None = None  # elements per block (None: ``BLOCK_ELEMENTS``); rounded up to ``ALIGN``
    prepass_bytes: int = 0  # input bytes the methods' per-tensor pre-passes read (``block_merger``)
    device: torch.device | None = None  # where each block is merged (tvq.device; None: the host)

    @property
    def elements(self) -> int:
        return block_elements(self.block, len(self.source.tasks))

    def plan(self, keys: Iterable[str]) -> set[str]:
        """The keys that stream by blocks: larger than a block, with every input readable by blocks."""
        pre = element_reader(self.source.pretrained)
        if pre is None:
            return set()
        return {k for k in keys if self._streams(k)}

    def _streams(self, key: str) -> bool:
        n = self.source.numel(key)
        if on_host(self.device):
            by_blocks = n > self.elements and self.method.merges_by_blocks(key, n)
        else:
            by_blocks = n > min(self.elements, DEVICE_MIN_ELEMENTS) and self.method.streams_on_device(key, n)
        return by_blocks and self.source.blocks(key) is not None

    def stream(self, key: str, dtype: torch.dtype | None) -> Chunked:
        """``key``'s merged tensor θ_pre + δ, cast to ``dtype`` (None: θ_pre's), by blocks."""
        pre = element_reader(self.source.pretrained)
        readers = self.source.blocks(key)
        if pre is None or readers is None:
            raise RuntimeError(f"'{key}' cannot be merged by blocks")  # plan() said it could: a bug
        self.source.count_read(key)
        meta = pre.meta(key)
        return Chunked(tuple(meta.shape), dtype or meta.dtype, self._chunks(key, readers, pre, dtype))

    def _chunks(
        self, key: str, readers: list[BlockReader], pre: SafetensorsReader | MemoryReader, dtype: torch.dtype | None
    ) -> Iterator[torch.Tensor]:
        n, step = self.source.numel(key), self.elements
        merger = self.method.block_merger(key, n, BlockPasses(partial(self._prepass, key), partial(self._parts, key)))
        for start in range(0, n, step):
            end = min(start + step, n)
            base = pre.get_elements(key, start, end)
            if on_host(self.device):
                yield merged_value(key, self._merge(merger, readers, start, end), base, dtype)
            else:
                yield merged_value(key, self._merge_on_device(merger, readers, start, end), base.to(self.device), dtype).cpu()
            heap.release()

    def _prepass(self, key: str) -> Iterator[tuple[int, torch.Tensor]]:
        """A fresh pass over ``key``'s blocks for a method's per-tensor statistics (counted read)."""
        self.prepass_bytes += self.source.nbytes(key)
        return tensor_blocks(self.source, key, self.block)

    def _parts(self, key: str) -> Iterator[list[CodedTensor | torch.Tensor]]:
        """A fresh pass over ``key``'s blocks as every task's part as read (counted read)."""
        self.prepass_bytes += self.source.nbytes(key)
        readers = self.source.blocks(key)
        if readers is None:
            raise RuntimeError(f"'{key}' cannot be read by blocks")  # plan() said it could: a bug
        n, step = self.source.numel(key), self.elements
        for start in range(0, n, step):
            yield [reader.read(start, min(start + step, n)) for reader in readers]

    def _merge_on_device(self, merger: BlockMerger, readers: list[BlockReader], start: int, end: int) -> torch.Tensor:
        """δ of elements ``[start, end)`` on ``device``, merged there from ``device_stack``."""
        assert self.device is not None
        stack = device_stack((reader.read(start, end) for reader in readers), len(readers), end - start, self.device)
        return merger.merge_tensor(start, stack).reshape(-1)

    def _merge(self, merger: BlockMerger, readers: list[BlockReader], start: int, end: int) -> torch.Tensor:
        """δ of elements ``[start, end)``: from every task's codes where all are coded and the
        method merges codes, else from the dense ``[T, n]`` stack (filled task by task)."""
        coded: list[CodedTensor] = []
        stack: torch.Tensor | None = None
        for i, reader in enumerate(readers):
            part = reader.read(start, end)
            if stack is None and isinstance(part, CodedTensor):
                coded.append(part)
                continue
            if stack is None:
                stack = torch.empty((len(readers), end - start))
                for j, earlier in enumerate(coded):
                    stack[j] = values(earlier)
            stack[i] = values(part) if isinstance(part, CodedTensor) else part
        if stack is None:
            merged = merger.merge_coded(start, coded) if may_code(self.method) else None
            if merged is not None:
                return merged
            stack = torch.empty((len(readers), end - start))
            for j, part in enumerate(coded):
                stack[j] = values(part)
        return merger.merge_tensor(start, stack).reshape(-1)
