"""TIES-Merging (Yadav et al. 2023): trim, elect sign by mass, disjoint mean, scale by λ.

Reference (prateeky2806/ties-merging, also MergeLM and AdaMerging's vision code): each task
vector is flattened over the *whole model* and trimmed to its top-k% magnitudes; the elected
sign is sign(Σ_t τ_t), with exact zeros set to the majority sign of the whole vector; the
merged entry is the mean of the trimmed entries that agree with that sign. ``scope=global``
(default) reproduces that with a streaming pre-pass (exact radix-select threshold, then the
majority sign); ``scope=tensor`` trims and elects per tensor, like mergekit's ``ties``.
One deliberate difference: the reference keeps int(k·n)+1 entries (its kthvalue is off by
one); tvq keeps int(k·n), as the comment in the reference intends and mergekit does.

With more combinations of codes than a lookup table holds (more than four 4-bit tasks), TIES
merges from the codes in a compiled loop (``tvq.merge.ties_kernel``), and global scope's
pre-pass from packs reads code histograms (``tvq.merge.ties_global``): same bytes.

Tensors larger than a block merge by blocks (tvq.merge.blocks, ``TiesBlocks``) with the same
bytes: once a task's cut-off is known (the value, and for the exact rule where the hash order
stops among the entries tied at it: the hash is a function of the flat index, so a block
computes it alone), trimming, the election and the disjoint mean are elementwise. The
per-tensor cut-offs (scope=tensor) come from passes over the blocks: an exact radix select
(``streamed_trim``), then the tie cut (``tie_cuts``; from codes, one pass: ``coded_tie_cuts``),
then the majority sign (``streamed_majority``); the global pre-pass streams the model by blocks
the same way.

The exact rule's tie cut from codes (issue 19) hashes every element in NumPy a cache-sized run
at a time (``CodeHasher``: cheaper than finding the tied entries first, and than a compiled
loop that hashes only the tied ones, measured) and finds the cut in a
window guessed around its expected hash (``WindowCut``: the hash is a bijection of the index,
independent of which entries tie), falling back to the radix cut when the guess misses; the
whole-tensor path moves the dropped entries in the joint index as it goes (``JointMove``).

Ties at the cut-off (``tie_rule``, see tvq.merge.ops): ``exact`` (default) keeps exactly
int(k·n) entries per task (per tensor, or per model for ``scope=global``), breaking ties at
the cut-off value in hash order; ``keep_ties`` keeps every entry >= the cut-off, as the
reference, FusionBench and tvq before it do, which on b-bit task vectors keeps far more.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Collection, Iterator, Sequence
from operator import itemgetter
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from tvq.device import on_host
from tvq.errors import ConfigError
from tvq.execute import memory_limit
from tvq.merge import ties_kernel
from tvq.merge.blocks import device_stack, model_blocks, model_parts
from tvq.merge.coded import (
    combination_values,
    joint_index,
    lookup,
    marginal_counts,
    weighted_kth_largest,
    worth_coding,
)
from tvq.merge.ops import (
    _ANY_INDEX,
    _C1,
    _C2,
    _M32,
    _NO_INDEX,
    _TIES_CHUNK,
    ALL_TIES,
    Block,
    TieRule,
    Trim,
    _mix32_int,
    cuts_trim,
    dropped_ties,
    element_hash,
    global_select,
    keep_count,
    mark_bits,
    row_cut,
    row_trim,
    tie_cuts,
    tie_seed,
    tied_cut,
    tied_entries,
    ties_merge,
    trimmed_sum,
)
from tvq.merge.registry import BlockMerger, BlockPasses, MergeMethod, MethodOptions, Parts, merge_method, tie_rule_field
from tvq.merge.source import TaskSource
from tvq.merge.ties_global import ModelCounts, coded_block_votes, key_parts, model_counts
from tvq.merge.weights import PerTask, PerTaskFraction, elect_and_fuse, per_task
from tvq.pack.blocks import values
from tvq.quant.coded import CodedTensor

TIES_BY_BLOCKS = True  # large tensors merge by blocks (tvq.merge.blocks); False: each tensor whole
# A tensor merges by blocks when merging it whole would hold more than this: (T + 3) fp32 copies.
# Below it the whole tensor is faster (one pass, one lookup table over its codes; by blocks, the
# cut-offs and the majority sign take extra passes: 3.3x the time of the whole path for a 4-task
# TVQ4 pack of the 1.1B Llama when every tensor streamed), so only the tensors that would
# dominate the merge's memory (embeddings, vocabulary matrices) pay for streaming.
WHOLE_TENSOR_BYTES = 512 << 20


def whole_tensor_bytes() -> int:
    """The working set above which a tensor streams: ``WHOLE_TENSOR_BYTES``, or less under a
    memory limit (a quarter of it, the executor's own budget), so a merge under a cgroup cap
    trades speed for finishing instead of being killed."""
    return min(WHOLE_TENSOR_BYTES, memory_limit() // 4)


# A tensor merged by blocks keeps the entries its exact tie rule drops as one bit per element and
# task up to this many bytes (32 MiB for a 4-task 65.5 M-element Llama embedding); above it, each
# pass finds and hashes them again.
MARK_BYTES = 64 << 20


class TiesOptions(MethodOptions):
    density: PerTaskFraction = Field(
        0.2, description="fraction of each task vector kept, top-k by magnitude (one value in [0, 1], or per task with scope=tensor)"
    )
    lam: float = Field(0.3, alias="lambda", description="scale of the merged vector")
    scope: Literal["global", "tensor"] = Field("global", description="top-k over the whole model (paper) or per tensor (mergekit)")
    aggregate: Literal["mean", "sum"] = Field("mean", description="disjoint mean (paper) or disjoint sum")
    tie_rule: TieRule = tie_rule_field()
    weight: PerTask = Field(
        1.0,
        description="weight of each task vector (one value or per task, mergekit's): the sign of Σ w τ is elected "
        "(a zero sum elects +), then Σ w τ (sum) or Σ w τ / Σ w (mean) over the agreeing tasks",
    )


class TiesStats:
    """What global TIES needs before streaming: per task the cut-off |τ| and where the top k
    ends among the entries tied at it (hash order over the whole model: hash, then tensor name,
    then index), the majority sign, and the entries kept per tensor."""

    def __init__(
        self,
        tasks: Sequence[str],
        thresholds: torch.Tensor,
        majority: float,
        hash_cut: Sequence[int] | None = None,
        cut_key: Sequence[str | None] | None = None,
        cut_index: Sequence[int] | None = None,
    ) -> None:
        self.tasks = list(tasks)
        self.thresholds = thresholds
        self.majority = majority
        self.hash_cut = list(hash_cut) if hash_cut is not None else [ALL_TIES] * len(self.tasks)
        self.cut_key: list[str | None] = list(cut_key) if cut_key is not None else [None] * len(self.tasks)
        self.cut_index = list(cut_index) if cut_index is not None else [_ANY_INDEX] * len(self.tasks)
        self.kept: dict[str, list[int]] = {}  # key -> entries kept per task

    def trim(self, key: str) -> Trim:
        """The trim of one tensor: the global cut-off, and the global tie cut seen from this tensor."""
        index_cut = []
        for t, cut_key in enumerate(self.cut_key):
            if cut_key is None or key < cut_key:
                index_cut.append(_ANY_INDEX)  # this tensor's entries at the cut hash come before the cut
            elif key == cut_key:
                index_cut.append(self.cut_index[t])
            else:
                index_cut.append(_NO_INDEX)
        seeds = [tie_seed(task, key) for task in self.tasks]
        return Trim(self.thresholds, list(self.hash_cut), index_cut, seeds, list(self.kept.get(key, [None] * len(self.tasks))))

    @classmethod
    def compute(
        cls, source: TaskSource, density: float, progress: bool = False, tie_rule: str = "exact", device: torch.device | None = None
    ) -> TiesStats:
        """The global cut-offs (code histograms, or two radix passes), the exact rule's tie cut
        (on the host), then the majority sign and kept counts: a pass that runs on ``device``
        (a GPU: each block's codes move there) when given."""
        tasks = list(source.tasks)
        rows = len(tasks)
        n = sum(source.numel(k) for k in source.keys)
        k = keep_count(density, n)
        stats = None
        if k >= n:
            stats = cls(tasks, torch.zeros(rows), 0.0)
        elif k == 0:
            stats = cls(tasks, torch.full((rows,), float("inf")), 0.0)
        else:
            passes = iter(("1/2", "2/2"))

            def batches() -> Iterator[torch.Tensor]:
                return map(itemgetter(2), model_blocks(source, desc=f"ties: global top-k (pass {next(passes)})", progress=progress))

            counted = model_counts(source, progress)
            thresholds, need, tied = counted.select(k) if counted is not None else global_select(batches, k, rows)
            stats = cls(tasks, thresholds, 0.0)
            short = [t for t in range(rows) if int(need[t]) < int(tied[t])]
            if tie_rule == "exact" and short:
                stats._break_ties(source, short, need, progress, counted)
        stats._vote(source, progress, device)
        return stats

    def _vote(self, source: TaskSource, progress: bool, device: torch.device | None = None) -> None:
        """The majority sign over the whole model and the entries kept per tensor: one pass by
        blocks (from the codes where every task's part is coded: ``coded_block_votes``; on
        ``device``, each block decoded there)."""
        votes = 0
        row = {key: i for i, key in enumerate(source.keys)}
        counts = torch.zeros((len(row), len(self.tasks)), dtype=torch.int64)  # one allocation: see ``ModelCounts``
        trim: Trim | None = None
        for key, start, block in model_parts(source, desc="ties: majority sign", progress=progress):
            if start == 0:
                trim = self.trim(key)
            assert trim is not None
            if not on_host(device):
                assert device is not None
                m = block[0].index.numel() if isinstance(block, list) else block.shape[1]
                votes += block_votes(device_stack(block, len(self.tasks), m, device), start, trim, counts[row[key]])
            elif isinstance(block, list) and ties_kernel.usable(block, start):
                votes += coded_block_votes(block, start, trim, counts[row[key]])
            else:
                dense = torch.stack([values(part) for part in block]) if isinstance(block, list) else block
                votes += block_votes(dense, start, trim, counts[row[key]])
            del block  # before the next block is read
        self.kept = dict(zip(row, counts.tolist(), strict=True))
        self.majority = float(torch.sign(torch.tensor(float(votes))))

    def _seed(self, t: int, key: str) -> int:
        return tie_seed(self.tasks[t], key)

    def _break_ties(self, source: TaskSource, short: list[int], need: torch.Tensor, progress: bool, counted: ModelCounts | None = None) -> None:
        """Where the top k of each task in ``short`` ends among its tied entries, in hash order
        (hash, tensor name, index; at a cut-off of 0, tensor name and index). With the model's
        code histograms (``counted``): a cut inside one coded tensor comes from one pass over
        its codes (``coded_tie_cuts``), and the rest read only the tensors holding tied entries
        (the others add nothing); else ``tie_cuts``, two streaming passes over the model."""
        left = {t: int(need[t]) for t in short}
        holding = None
        if counted is not None:
            for key, ranks in counted.one_tensor_cuts(self.thresholds, left).items():
                if source.numel(key) > _HASHED_MAX:
                    continue
                seeds = [self._seed(t, key) for t in range(len(self.tasks))]
                needs, tied = {t: r for t, (r, _) in ranks.items()}, {t: n for t, (_, n) in ranks.items()}
                cuts = coded_tie_cuts(key_parts(source, key), needs, tied, self.thresholds, seeds, {})
                for t, (cut, index) in (cuts or {}).items():
                    self.hash_cut[t], self.cut_key[t], self.cut_index[t] = cut, key, index
                    del left[t]
            holding = counted.tied_keys(self.thresholds, list(left))
        if not left:
            return
        passes = iter(("1/2", "2/2"))

        def stream(keys: Collection[str] | None) -> Iterator[tuple[str, int, Block]]:
            wanted = holding if keys is None else (set(keys) if holding is None else holding & set(keys))
            return model_parts(source, desc=f"ties: tie-break (pass {next(passes)})", progress=progress, keys=wanted)

        for t, (cut, key, index) in tie_cuts(stream, self._seed, self.thresholds, left).items():
            self.hash_cut[t], self.cut_key[t], self.cut_index[t] = cut, key, index


def record_stats(method: MergeMethod, stats: TiesStats, source: TaskSource) -> None:
    """Note what global TIES keeps of every tensor (counted by its pre-pass, on the driver)."""
    for key, counts in stats.kept.items():
        method.record_kept(key, counts, source.numel(key))


def ties_tensor(
    taus: torch.Tensor,
    density: float,
    stats: TiesStats | None,
    aggregate: str,
    tasks: Sequence[str],
    key: str,
    tie_rule: str,
    record: MergeMethod | None = None,
) -> torch.Tensor:
    """Unscaled TIES merge of one tensor (``taus`` is left unchanged): global cuts when ``stats``
    is given, else per-tensor top-k with ``tie_rule`` (ties broken by the tasks' names and ``key``).
    ``record`` gets the entries kept per task."""
    if stats is not None:
        return ties_merge(taus, stats.trim(key).merge_mask, stats.majority, aggregate)
    trim = row_trim(taus, density, [tie_seed(task, key) for task in tasks], tie_rule)
    if record is not None:
        record.record_kept(key, trim.kept, taus[0].numel())
    return ties_merge(taus, trim.merge_mask, None, aggregate)


def streamed_trim(passes: BlockPasses, key: str, n: int, counts: Sequence[int], tasks: Sequence[str], rule: str) -> Trim:
    """``task_trim`` of a tensor read by blocks (task t keeps ``counts[t]`` of its ``n`` entries):
    the same thresholds, tie cuts and kept counts as ``row_cut`` on the whole tensor, from code
    histograms (``code_select``: every input coded) or an exact radix select over the blocks
    (``global_select``) and, for the exact rule, the hash-order cut among the tied entries
    (``tie_cuts``, or ``coded_tie_cuts`` in one pass over the codes); a few passes, no copy of
    the tensor. The entries the exact rule drops are marked on the way, a bit per element and
    task (``Trim.dropped``, at most ``MARK_BYTES``), so the later passes do not hash them again."""
    rows = len(counts)
    dropped: dict[int, torch.Tensor] = {}
    thresholds = torch.tensor([0.0 if k >= n else float("inf") for k in counts])
    hash_cut, index_cut = [ALL_TIES] * rows, [_ANY_INDEX] * rows
    kept: list[int | None] = [min(k, n) for k in counts]
    selected = [t for t in range(rows) if 0 < counts[t] < n]
    if selected:
        ks = torch.tensor([min(max(k, 1), n) for k in counts])
        selection = code_select(passes.parts, ks)
        found, need, tied = selection or global_select(lambda: map(itemgetter(1), passes.dense()), ks, rows)
        short: dict[int, int] = {}
        for t in selected:
            thresholds[t] = found[t]
            if rule == "keep_ties":
                kept[t] = counts[t] - int(need[t]) + int(tied[t])
            elif int(need[t]) < int(tied[t]):
                short[t] = int(need[t])

        def stream(keys: Collection[str] | None) -> Iterator[tuple[str, int, torch.Tensor]]:
            return map(lambda item: (key, *item), passes.dense())  # one tensor: every pass reads it

        hashed = [t for t in short if float(thresholds[t]) != 0]
        if len(hashed) * ((n + 7) // 8) <= MARK_BYTES:
            dropped = {t: torch.zeros((n + 7) // 8, dtype=torch.uint8) for t in hashed}
        seeds = [tie_seed(task, key) for task in tasks]
        coded_cuts = None
        if selection is not None and short and n <= _HASHED_MAX:
            coded_cuts = coded_tie_cuts(passes.parts, short, {t: int(tied[t]) for t in short}, thresholds, seeds, dropped)
        if coded_cuts is not None:
            for t, (cut, index) in coded_cuts.items():
                hash_cut[t], index_cut[t] = cut, index
            short = {}
        else:
            for marks in dropped.values():
                marks.zero_()
        cuts = tie_cuts(stream, lambda t, name: tie_seed(tasks[t], name), thresholds, short, dropped) if short else {}
        for t, (cut, _, index) in cuts.items():
            hash_cut[t], index_cut[t] = cut, index
    return Trim(thresholds, hash_cut, index_cut, [tie_seed(task, key) for task in tasks], kept, dropped)


def coded_tie_cuts(
    parts: Parts, need: dict[int, int], tied: dict[int, int], thresholds: torch.Tensor, seeds: Sequence[int], marks: dict[int, torch.Tensor]
) -> dict[int, tuple[int, int]] | None:
    """``tie_cuts`` of one coded tensor read by blocks (below 2^32 elements; ``tied[t]`` entries
    of task t tied at its cut-off): (hash cut, index cut) per task of ``need``, from one pass
    over the codes. At a non-zero cut-off a ``WindowCut`` hashes every element in NumPy (instead
    of finding the tied values and hashing them, twice) and the entries past the cut are marked
    in ``marks[t]`` where given; at a cut-off of 0 the cut is the ``need[t]``-th zero in index
    order. None when an input is not coded or a cut lies outside its window: ``tie_cuts`` then
    decides (``marks`` must be zeroed again)."""
    windows: dict[int, WindowCut] = {}
    zeros: dict[int, CodeHasher] = {}  # tasks cut at 0 whose cut is still ahead
    cuts: dict[int, tuple[int, int]] = {}
    left = dict(need)
    drop = np.empty(_HASH_CHUNK, dtype=np.bool_)
    start = 0
    for block in parts():
        if not all(isinstance(part, CodedTensor) and part.index.device.type == "cpu" for part in block):
            return None
        coded = [part for part in block if isinstance(part, CodedTensor)]
        if not start:
            for t in need:
                codes = torch.nonzero(coded[t].table.abs() == thresholds[t]).squeeze(1).tolist()
                if float(thresholds[t]) == 0:
                    zeros[t] = CodeHasher(0, codes, _HASH_CHUNK)
                else:
                    windows[t] = WindowCut(seeds[t], codes, tied[t], need[t], _HASH_CHUNK)
        m = coded[0].index.numel()
        for t, window in windows.items():
            bits = marks[t].numpy() if t in marks else None
            for at in range(0, m, _HASH_CHUNK):
                part = coded[t].index[at : at + _HASH_CHUNK]
                d = drop[: part.numel()]
                window.feed(start + at, part, torch.from_numpy(d))
                if bits is not None:  # block starts and chunks are multiples of 8 elements
                    packed = np.packbits(d, bitorder="little")
                    bits[(start + at) >> 3 : ((start + at) >> 3) + packed.size] = packed
        for t, hasher in list(zeros.items()):
            for at in range(0, m, _HASH_CHUNK):
                hit = hasher.tied(coded[t].index[at : at + _HASH_CHUNK].numpy())
                count = int(np.count_nonzero(hit))
                if left[t] <= count:
                    cuts[t] = (0, start + at + int(np.flatnonzero(hit)[left[t] - 1]))
                    del zeros[t]
                    break
                left[t] -= count
        start += m
        del block, coded  # before the next block is read
    if zeros:
        return None  # fewer zeros than counted: not the tensor the counts came from
    for t, window in windows.items():
        found = window.finish()
        if found is None:
            return None
        cuts[t] = found[:2]
        if t in marks:
            mark_bits(marks[t], found[2])
    return cuts


def code_select(parts: Parts, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``global_select``'s answer (per task: the ks[t]-th largest |τ̂|, how many entries equal to
    it the top k takes, how many there are) from each task's code histogram: one pass that
    decodes no values; None when an input is not coded (the value table is the tensor's own)."""
    tables: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    for block in parts():
        coded = [part for part in block if isinstance(part, CodedTensor)]
        if len(coded) != len(block):
            return None
        if not counts:
            tables = [c.table.abs() for c in coded]
            counts = [torch.zeros(c.table.numel(), dtype=torch.int64) for c in coded]
        for count, c in zip(counts, coded, strict=True):
            count += torch.bincount(c.index, minlength=count.numel())
        del block, coded  # before the next block is read
    found, need, tied = [], [], []
    for mag, count, k in zip(tables, counts, ks.tolist(), strict=True):
        value = weighted_kth_largest(mag, count, k)
        found.append(value)
        need.append(k - int(count[mag > value].sum()))
        tied.append(int(count[mag == value].sum()))
    return torch.stack(found), torch.tensor(need), torch.tensor(tied)


def streamed_majority(passes: BlockPasses, trim: Trim) -> float:
    """The majority sign of one tensor read by blocks, as ``ties_merge`` elects it on the whole
    tensor: the sign of the sum of the elements' elected signs (an exact integer count), from
    the codes where every input is coded (``ties_kernel.coded_votes``), else the dense blocks."""
    votes = coded_majority_votes(passes.parts, trim)
    if votes is None:
        votes = 0
        for start, block in passes.dense():
            votes += block_votes(block, start, trim)
            del block  # before the next block is read
    return float(torch.sign(torch.tensor(float(votes))))


def coded_majority_votes(parts: Parts, trim: Trim) -> int | None:
    """``streamed_majority``'s count from the codes, one compiled pass; None when an input is not coded."""
    votes = start = 0
    for block in parts():
        coded = [part for part in block if isinstance(part, CodedTensor)]
        if len(coded) != len(block) or not ties_kernel.usable(coded, start):
            return None
        votes += ties_kernel.coded_votes(coded, ties_kernel.CodeTrim.of(coded, trim), start)
        start += coded[0].index.numel()
        del block, coded  # before the next block is read
    return votes


def block_votes(block: torch.Tensor, start: int, trim: Trim, kept: torch.Tensor | None = None) -> int:
    """Σ of the elected signs of a ``[T, m]`` block from flat index ``start``; adds the entries
    each task keeps to ``kept`` (counted with ``Trim.mask``, the zeros a trim keeps included)."""
    votes = 0
    for at in range(0, block.shape[1], _TIES_CHUNK):
        part = block[:, at : at + _TIES_CHUNK]
        keep = trim.mask(part, start + at) if kept is not None else trim.merge_mask(part, start + at)
        votes += int(torch.sign(trimmed_sum(part, keep)).sum(dtype=torch.int64))
        if kept is not None:
            kept += keep.sum(dim=1).to(kept.device)
    return votes


class TiesBlocks(BlockMerger):
    """TIES of one tensor block by block, once its trim (per tensor, or the global one seen from
    this tensor) and majority sign are known: every element then gets ``Ties.merge_tensor``'s
    fp32 operations (the keep mask at the element's flat index in the tensor)."""

    method: Ties

    def __init__(self, method: Ties, key: str, trim: Trim, majority: float | None) -> None:
        super().__init__(method, key)
        self.trim, self.majority = trim, majority

    def merge_tensor(self, start: int, taus: torch.Tensor) -> torch.Tensor:
        o = self.method.options

        def keep(part: torch.Tensor, at: int) -> torch.Tensor:
            return self.trim.merge_mask(part, start + at)

        if not self.method.weighted:
            return ties_merge(taus, keep, self.majority, o.aggregate).mul_(o.lam)
        for at in range(0, taus.shape[1], _TIES_CHUNK):
            part = taus[:, at : at + _TIES_CHUNK]
            part.masked_fill_(~keep(part, at), 0.0)
        return elect_and_fuse(taus, self.method.weights, o.aggregate == "mean").mul_(o.lam)

    def merge_coded(self, start: int, coded: list[CodedTensor]) -> torch.Tensor | None:
        """``Ties.merge_coded`` on one block: a lookup table over the block's combinations of
        codes, with the tensor's trim and majority sign (None: the dense block)."""
        method = self.method
        if method.weighted or method.density is None:
            return None
        if not worth_coding(coded):
            return self._compiled(start, coded)
        split = [split_ties(c, self.trim, t, start) for t, c in enumerate(coded)]
        if not worth_coding([c for c, _ in split]):
            return self._compiled(start, coded)
        coded = [c for c, _ in split]
        keep = combination_keep([keep for _, keep in split])
        lut = ties_merge(combination_values(coded), lambda part, at: keep[:, at : at + part.shape[1]], self.majority, method.options.aggregate)
        return lookup(lut.mul_(method.options.lam), joint_index(coded))

    def _compiled(self, start: int, coded: list[CodedTensor]) -> torch.Tensor | None:
        """The block from its codes in one compiled pass (``ties_kernel``), the majority sign known."""
        if self.majority is None or not ties_kernel.usable(coded, start):
            return None
        o = self.method.options
        merged = ties_kernel.coded_ties(coded, ties_kernel.CodeTrim.of(coded, self.trim), self.majority, o.aggregate == "mean", start)
        return merged.mul_(o.lam)


def task_trim(taus: torch.Tensor, densities: Sequence[float], seeds: Sequence[int], rule: str) -> Trim:
    """``row_trim`` with a density per task (per tensor): task t keeps ``keep_count(densities[t], n)``."""
    flat = taus.reshape(taus.shape[0], -1)
    n = flat.shape[1]
    return cuts_trim([row_cut(row, keep_count(d, n), seed, rule) for row, d, seed in zip(flat, densities, seeds, strict=True)], seeds)


@merge_method("ties", aliases=("ties_merging",))
class Ties(MergeMethod):
    """TIES; with per-task weights (or densities) as mergekit's ``ties``: trim each task at its
    density, weight, elect the sign of the weighted sum and fuse (``tvq.merge.weights.elect_and_fuse``).
    Unit weights and one density are the paper's path, bit for bit."""

    Options = TiesOptions
    options: TiesOptions
    stats: TiesStats | None = None
    on_device = True  # the trim (cut-offs, tie marks) and majority come from the host; each block's mask is made where it merges

    def __init__(self, options: TiesOptions, tasks: list[str], task: str | None = None) -> None:
        super().__init__(options, tasks, task)
        o = self.options
        self.densities = per_task(o.density, self.tasks, "density", self.name)
        self.weights = torch.tensor(per_task(o.weight, self.tasks, "weight", self.name))
        self.density = self.densities[0] if len(set(self.densities)) == 1 else None  # one density for every task
        self.weighted = not bool((self.weights == 1).all())
        if self.density is None and o.scope == "global":
            raise ConfigError("ties: a density per task needs scope=tensor (the global top-k takes one density)")

    def prepare(self, source: TaskSource, progress: bool = False) -> None:
        o = self.options
        if o.scope == "global":
            assert self.density is not None
            self.stats = TiesStats.compute(source, self.density, progress, o.tie_rule, self.prepass_device)
            record_stats(self, self.stats, source)

    def merges_by_blocks(self, key: str, numel: int) -> bool:
        return TIES_BY_BLOCKS and (len(self.tasks) + 3) * numel * 4 > whole_tensor_bytes()

    def streams_on_device(self, key: str, numel: int) -> bool:
        """On a GPU, global TIES streams every tensor (its trim and majority come from the
        pre-pass: no pass of its own, and the whole-tensor path is the host's); per tensor, the
        cut-offs and majority take passes over the host's codes, so the host's rule holds."""
        return (TIES_BY_BLOCKS and self.options.scope == "global") or self.merges_by_blocks(key, numel)

    def block_merger(self, key: str, numel: int, passes: BlockPasses) -> BlockMerger:
        """The tensor's trim and majority sign from passes over its blocks (scope=tensor) or the
        global pre-pass, then ``TiesBlocks``."""
        if self.options.scope == "global" and self.stats is None:
            raise RuntimeError("global TIES needs prepare() (its pre-pass) before merging")
        if self.stats is not None:
            return TiesBlocks(self, key, self.stats.trim(key), None if self.weighted else self.stats.majority)
        counts = [keep_count(d, numel) for d in self.densities]
        trim = streamed_trim(passes, key, numel, counts, self.tasks, self.options.tie_rule)
        self.record_kept(key, trim.kept, numel)
        return TiesBlocks(self, key, trim, None if self.weighted else streamed_majority(passes, trim))

    def topk_density(self) -> float | None:
        return self.density if self.density is not None else sum(self.densities) / len(self.densities)

    def exact_kept(self, key: str, shape: tuple[int, ...]) -> int | None:
        o = self.options
        if self.density is None or o.scope != "tensor" or o.tie_rule != "exact":
            return None
        return keep_count(self.density, _numel(shape))

    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.scope == "global" and self.stats is None:
            raise RuntimeError("global TIES needs prepare() (its pre-pass) before merge_tensor()")
        if self.density is not None and not self.weighted:
            return ties_tensor(taus, self.density, self.stats, o.aggregate, self.tasks, key, o.tie_rule, self).mul_(o.lam)
        if self.stats is not None:
            trim = self.stats.trim(key)
        else:
            trim = task_trim(taus, self.densities, [tie_seed(t, key) for t in self.tasks], o.tie_rule)
            self.record_kept(key, trim.kept, taus[0].numel())
        if not self.weighted:
            return ties_merge(taus, trim.merge_mask, None, o.aggregate).mul_(o.lam)
        flat = taus.reshape(taus.shape[0], -1)
        for start in range(0, flat.shape[1], _TIES_CHUNK):
            part = flat[:, start : start + _TIES_CHUNK]
            part.masked_fill_(~trim.merge_mask(part, start), 0.0)
        return elect_and_fuse(taus, self.weights, o.aggregate == "mean").mul_(o.lam)

    def merge_coded(self, key: str, coded: list[CodedTensor]) -> torch.Tensor | None:
        """TIES once per combination of codes: the per-tensor thresholds (k-th largest |τ̂_t|)
        and majority sign come exactly from code histograms, then ``ties_merge`` runs on the
        combinations, so every element gets the bytes the dense path gives it. With the exact
        rule, which of the entries tied at a cut-off are kept depends on their index: the entries
        a task drops (the dense path's hash order, found once per task by ``coded_trim``) move
        to a code it does not keep (``split_ties``) before the joint index is made."""
        if self.density is None or self.weighted:
            return None  # per-task weights or densities: the dense path
        o = self.options
        if o.scope == "global" and self.stats is None:
            raise RuntimeError("global TIES needs prepare() (its pre-pass) before merge_coded()")
        if not worth_coding(coded):
            return self._compiled(key, coded)
        n = coded[0].index.numel()
        joint = per_combination = None
        if self.stats is not None:
            trim = self.stats.trim(key)
        else:  # the joint histogram gives each task's
            joint = joint_index(coded)
            per_combination = torch.bincount(joint, minlength=combination_count(coded))
            counts = marginal_counts(per_combination, coded)
            moved: set[int] = set()
            trim = coded_trim(coded, counts, self.density, [tie_seed(t, key) for t in self.tasks], o.tie_rule, joint, moved)
            self.record_kept(key, trim.kept, n)
            keeps = moved_joint(joint, coded, trim, moved)
            if keeps is not None:  # the dropped entries' combinations moved in place: no copy of the codes
                keep = combination_keep(keeps[0])
                if (keeps[1] or moved) and majority_matters(coded, keep):
                    per_combination = torch.bincount(joint, minlength=combination_count(coded))
                return self._coded_lut(coded, keep, per_combination, joint)
        split = [split_ties(c, trim, t) for t, c in enumerate(coded)]
        if any(new is not old for (new, _), old in zip(split, coded, strict=True)):
            if not worth_coding([c for c, _ in split]):  # copies of the tied codes made the table larger than the tensor
                return self._compiled(key, coded, trim)
            coded = [c for c, _ in split]
            joint = per_combination = None
        joint = joint_index(coded) if joint is None else joint
        keep = combination_keep([keep for _, keep in split])
        if self.stats is None and per_combination is None:
            per_combination = torch.bincount(joint, minlength=combination_count(coded))
        return self._coded_lut(coded, keep, per_combination, joint)

    def _compiled(self, key: str, coded: list[CodedTensor], trim: Trim | None = None) -> torch.Tensor | None:
        """TIES from codes without a lookup table (too many combinations): the trim from the
        tasks' code histograms (``coded_trim``), then one compiled pass (``tvq.merge.ties_kernel``)."""
        if not ties_kernel.usable(coded):
            return None
        o = self.options
        majority = None
        if self.stats is not None:
            trim, majority = self.stats.trim(key), self.stats.majority
        elif trim is None:
            assert self.density is not None
            counts = [torch.bincount(c.index, minlength=c.values) for c in coded]
            trim = coded_trim(coded, counts, self.density, [tie_seed(t, key) for t in self.tasks], o.tie_rule, marks=False)
            self.record_kept(key, trim.kept, coded[0].index.numel())
        code_trim = ties_kernel.CodeTrim.of(coded, trim)
        return ties_kernel.coded_ties(coded, code_trim, majority, o.aggregate == "mean").mul_(o.lam)

    def _coded_lut(self, coded: list[CodedTensor], keep: torch.Tensor, per_combination: torch.Tensor | None, joint: torch.Tensor) -> torch.Tensor:
        """The merged tensor from its lookup table over the combinations of codes (``keep``:
        which task keeps its entry in each; ``per_combination``: the elements of each, for this
        tensor's majority sign, or None with the global one)."""
        o = self.options
        combos = combination_values(coded)
        if per_combination is None:
            assert self.stats is not None
            majority = self.stats.majority
        else:
            signs = torch.sign(trimmed_sum(combos, keep)).to(torch.int64)
            majority = float(torch.sign((signs * per_combination).sum()))
        lut = ties_merge(combos, lambda part, start: keep[:, start : start + part.shape[1]], majority, o.aggregate).mul_(o.lam)
        return lookup(lut, joint)


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for s in shape:
        total *= s
    return total


def combination_count(coded: list[CodedTensor]) -> int:
    return _numel([c.values for c in coded])


def coded_thresholds(coded: list[CodedTensor], counts: list[torch.Tensor], density: float) -> torch.Tensor:
    """Per task, the |τ̂| an entry needs to be in the top-k: the k-th largest from the code histogram."""
    n = coded[0].index.numel()
    k = keep_count(density, n)
    if k >= n:
        return torch.zeros(len(coded))
    if k == 0:
        return torch.full((len(coded),), float("inf"))
    return torch.stack([weighted_kth_largest(c.table.abs(), count, k) for c, count in zip(coded, counts, strict=True)])


def coded_trim(
    coded: list[CodedTensor],
    counts: list[torch.Tensor],
    density: float,
    seeds: list[int],
    tie_rule: str,
    joint: torch.Tensor | None = None,
    moved: set[int] | None = None,
    marks: bool = True,
) -> Trim:
    """Per-tensor top-k from codes: the dense ``row_trim`` (same thresholds, same tie cut, same
    counts, same ``Trim.dropped``), with the histograms standing in for passes over the values.

    With ``joint`` (``joint_index`` of ``coded``) and ``moved``: a task whose dropped entries
    can move to a code of smaller |value| moves them in ``joint`` as its cut is found
    (``JointMove``: ``split_ties`` on the joint index, with no mask of them kept), and is
    added to ``moved``. ``marks=False``: no ``Trim.dropped`` (a consumer that hashes the tied
    entries itself, ``ties_kernel``, needs no mask of n bytes per task)."""
    n = coded[0].index.numel()
    strides = [combination_count(coded[t + 1 :]) for t in range(len(coded))]
    scratch = np.empty(min(_HASH_CHUNK, n), dtype=np.int32) if joint is not None else None
    k = keep_count(density, n)
    thresholds = coded_thresholds(coded, counts, density)
    hash_cut: list[int] = []
    index_cut: list[int] = []
    kept: list[int | None] = []
    dropped: dict[int, torch.Tensor] = {}
    for t, (c, count, thr, seed) in enumerate(zip(coded, counts, thresholds, seeds, strict=True)):
        mag = c.table.abs()
        above = int(count[mag > thr].sum())
        tied = int(count[mag == thr].sum())
        cut, index = ALL_TIES, _ANY_INDEX
        if k >= n or k == 0:
            kept.append(min(k, n))
        elif tie_rule == "keep_ties" or above + tied == k:
            kept.append(above + tied)
        else:
            move = None
            spare = torch.nonzero(mag < thr).squeeze(1)
            movable = spare.numel() and float(thr) != 0 and n <= _HASHED_MAX and c.index.device.type == "cpu"
            if joint is not None and moved is not None and scratch is not None and movable and joint.device.type == "cpu":
                move = JointMove(joint.numpy(), int(spare[0]), strides[t], scratch)
                moved.add(t)
            cut, index, drop = coded_tied_cut(c, torch.nonzero(mag == thr).squeeze(1), seed, float(thr), k - above, tied, move, marks)
            if drop is not None and marks:
                dropped[t] = drop
            kept.append(k)
        hash_cut.append(cut)
        index_cut.append(index)
    return Trim(thresholds, hash_cut, index_cut, seeds, kept, dropped)


def coded_tied_cut(
    c: CodedTensor,
    codes: torch.Tensor,
    seed: int,
    threshold: float,
    need: int,
    tied: int | None = None,
    move: JointMove | None = None,
    marks: bool = True,
) -> tuple[int, int, torch.Tensor | None]:
    """``tied_cut`` of the elements whose code is one of ``codes`` (the cut-off's; ``tied``
    of them, counted here when None): (hash cut, index cut, a bool mask of the dropped
    elements for ``Trim.dropped``, None at a cut-off of 0).

    One pass over the codes (``WindowCut``): every element's hash is computed in int32 a
    cache-sized chunk at a time (cheaper than finding the tied entries first), the entries
    past a window guessed around the cut are marked dropped on the way, and the few inside
    it are kept; when the cut falls outside the window (a vanishing chance), the radix
    cut of the tied entries (``radix_coded_tied_cut``) decides.

    ``move`` (at a non-zero cut-off, below 2^32 elements, on the CPU): the dropped entries
    move in its joint index instead, chunk by chunk, and no mask of them is returned (but
    for the radix cut's). ``marks=False``: the mask may be None (the window pass marks into one
    chunk's scratch)."""
    n = c.index.numel()
    if move is not None:
        return moved_tied_cut(c, codes, seed, need, tied, move)
    if threshold == 0 or n > _HASHED_MAX:
        return tied_cut(tied_entries(c, codes), seed, threshold, need, n)
    if c.index.device.type == "cpu":
        if tied is None:
            tied = int(torch.bincount(c.index, minlength=c.values)[codes].sum())
        window = WindowCut(seed, codes.tolist(), tied, need, min(_HASH_CHUNK, n))
        dropped = torch.empty(n if marks else min(_HASH_CHUNK, n), dtype=torch.bool)
        for start in range(0, n, _HASH_CHUNK):
            part = c.index[start : start + _HASH_CHUNK]
            window.feed(start, part, dropped[start : start + _HASH_CHUNK] if marks else dropped[: part.numel()])
        found = window.finish()
        if found is not None:
            cut, index, past = found
            if not marks:
                return cut, index, None
            dropped[past] = True
            return cut, index, dropped
    return radix_coded_tied_cut(c, codes, seed, need)


class JointMove:
    """Moves a task's dropped entries to its ``spare`` code in a joint index (``joint_index``,
    as NumPy int32, changed in place): each one's combination changes by (spare - code)·stride,
    a few vector operations in ``scratch`` (int32) a chunk at a time."""

    def __init__(self, joint: np.ndarray, spare: int, stride: int, scratch: np.ndarray) -> None:
        self.joint, self.spare, self.stride, self.scratch = joint, spare, stride, scratch

    def apply(self, start: int, codes: np.ndarray, drop: np.ndarray, sign: int = 1) -> None:
        """Move the elements from ``start`` (``codes``) where the bool ``drop`` is set (``sign``
        -1: move them back)."""
        d = self.scratch[: codes.size]
        np.subtract(np.int32(self.spare), codes, out=d, dtype=np.int32)
        np.multiply(d, drop.view(np.uint8), out=d)
        np.multiply(d, np.int32(self.stride * sign), out=d)
        part = self.joint[start : start + codes.size]
        np.add(part, d, out=part)

    def apply_at(self, where: np.ndarray, codes: np.ndarray) -> None:
        """Move the elements at flat indices ``where`` (``codes``: the whole tensor's)."""
        if where.size:
            self.joint[where] += (np.int32(self.spare) - codes[where].astype(np.int32)) * np.int32(self.stride)


def moved_tied_cut(
    c: CodedTensor, codes: torch.Tensor, seed: int, need: int, tied: int | None, move: JointMove
) -> tuple[int, int, torch.Tensor | None]:
    """``coded_tied_cut`` moving the dropped entries in ``move``'s joint index as the window
    pass finds them (``WindowCut``; the few inside the window past the cut at the end). If
    the cut lies outside the window, the pass is repeated to move those entries back, and
    the radix cut's mask is moved instead."""
    n = c.index.numel()
    index = c.index.numpy()
    if tied is None:
        tied = int(torch.bincount(c.index, minlength=c.values)[codes].sum())
    chunk = min(_HASH_CHUNK, n)
    drop = torch.empty(chunk, dtype=torch.bool)
    flags = drop.numpy()

    def window_pass(sign: int) -> WindowCut:
        window = WindowCut(seed, codes.tolist(), tied, need, chunk)
        for start in range(0, n, chunk):
            part = c.index[start : start + chunk]
            window.feed(start, part, drop[: part.numel()])
            move.apply(start, index[start : start + chunk], flags[: part.numel()], sign)
        return window

    found = window_pass(1).finish()
    if found is not None:
        cut, at, past = found
        move.apply_at(past.numpy(), index)
        return cut, at, None
    window_pass(-1)  # back to the codes as they were
    cut, at, dropped = radix_coded_tied_cut(c, codes, seed, need)
    assert dropped is not None
    mask = dropped.numpy()
    for start in range(0, n, chunk):
        move.apply(start, index[start : start + chunk], mask[start : start + chunk])
    return cut, at, dropped


def radix_coded_tied_cut(c: CodedTensor, codes: torch.Tensor, seed: int, need: int) -> tuple[int, int, torch.Tensor | None]:
    """``coded_tied_cut`` at a non-zero cut-off without a guess, a chunk of elements at a time:
    each tied entry is found and hashed once, and the scratch is a chunk's.

    Pass 1 hashes the chunk's tied entries, keeps them (flat index and hash - 2^31, both
    int32: the hash's order survives the shift) and counts the hashes' high halves; the
    bucket holding the ``need``-th hash is then sorted alone, and the entries past the cut
    are marked in a bool mask of the elements (``Trim.dropped``). Below 2^32 elements the
    hash is a bijection of the index (``element_hash``): no two tied entries share a hash, so
    (hash, index) order is hash order and nothing past the cut has the cut's hash."""
    n = c.index.numel()
    found: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for start in range(0, n, _CUT_CHUNK):
        where = tied_entries(c, codes, start, start + _CUT_CHUNK)
        if not where.numel():
            continue
        hashes = element_hash(seed, where)
        hist += torch.bincount(hashes >> 16, minlength=1 << 16)
        found.append((start, where.sub_(start).to(torch.int32), hashes.sub_(_HALF).to(torch.int32)))
    cum = hist.cumsum(0)
    bucket = int(torch.searchsorted(cum, torch.tensor([need], dtype=cum.dtype)))  # first bin reaching the count
    rank = need - (int(cum[bucket]) - int(hist[bucket]))
    low, high = (bucket << 16) - _HALF, ((bucket + 1) << 16) - _HALF
    bucket_hashes, bucket_index = [], []
    for start, where, hashes in found:
        inside = (hashes >= low).logical_and_(hashes < high)
        bucket_hashes.append(hashes[inside])
        bucket_index.append(where[inside].long() + start)
    in_bucket = torch.cat(bucket_hashes)
    at = int(torch.sort(in_bucket, stable=True).indices[rank - 1])
    cut, index = int(in_bucket[at]), int(torch.cat(bucket_index)[at])
    dropped = torch.zeros(n, dtype=torch.bool)
    for start, where, hashes in found:
        dropped[start : start + _CUT_CHUNK][where] = hashes > cut
    return cut + _HALF, index, dropped


_CUT_CHUNK = 1 << 20
_HALF = 1 << 31
_HASHED_MAX = 1 << 32  # flat indices below it hash without collisions (``element_hash``)
_HASH_CHUNK = 1 << 17  # elements hashed at a time: scratch that stays in the CPU's cache
_WINDOW_SIGMAS = 12.0  # ``WindowCut``'s half-width, in standard deviations of the cut's rank
_WINDOW_SLACK = 64  # ... plus this many entries


class CodeHasher:
    """``element_hash`` of runs of consecutive flat indices (below 2^32) and the tied entries
    among them (the elements whose code is one of ``codes``), in NumPy: uint32 arithmetic
    wraps and shifts logically as the mixer needs, and its comparisons, counts and bit
    operations on a cache-sized run cost a few times less than torch's. One run at a time, in
    the hasher's own buffers (valid until the next call)."""

    def __init__(self, seed: int, codes: Sequence[int], chunk: int) -> None:
        self.lo = np.uint32(seed & _M32)
        self.high = np.uint32(_mix32_int((seed >> 32) & _M32))
        self.codes = list(codes)
        self.base = np.arange(chunk, dtype=np.uint32)
        self.span = 1 << (chunk.bit_length() - 1) if chunk > 0 else 1  # a power of two <= chunk
        self.base_lo = np.bitwise_xor(self.base[: self.span], np.uint32((seed & _M32) % self.span))  # (j ^ lo) for j < span
        self.x = np.empty(chunk, dtype=np.uint32)
        self.tmp = np.empty(chunk, dtype=np.uint32)
        self.hit = np.empty(chunk, dtype=np.bool_)
        self.scratch = np.empty(chunk, dtype=np.bool_)

    def hashes(self, start: int, m: int) -> np.ndarray:
        """The hashes of flat indices ``start`` to ``start + m`` (uint32)."""
        x, tmp = self.x[:m], self.tmp[:m]
        if start % self.span == 0 and m <= self.span:  # (start + j) ^ lo = ((start ^ lo) with the low bits cleared) + (j ^ lo's low bits)
            np.add(self.base_lo[:m], np.uint32((start ^ int(self.lo)) & ~(self.span - 1) & _M32), out=x)
        else:
            np.add(self.base[:m], np.uint32(start), out=x)
            np.bitwise_xor(x, self.lo, out=x)
        for shift, factor in ((16, _C1), (15, _C2)):
            np.bitwise_xor(x, np.right_shift(x, shift, out=tmp), out=x)
            np.multiply(x, np.uint32(factor), out=x)
        np.bitwise_xor(x, np.right_shift(x, 15, out=tmp), out=x)
        return np.bitwise_xor(x, self.high, out=x)

    def tied(self, index: np.ndarray) -> np.ndarray:
        """Whether each of these codes is one of the tied codes (bool)."""
        m = index.size
        hit = np.equal(index, self.codes[0], out=self.hit[:m])
        for code in self.codes[1:]:
            np.bitwise_or(hit, np.equal(index, code, out=self.scratch[:m]), out=hit)
        return hit


def hashed_dropped(index: torch.Tensor, start: int, codes: Sequence[int], seed: int, hash_cut: int, index_cut: int) -> torch.Tensor:
    """``dropped_ties`` as a bool mask of the elements from flat index ``start`` whose codes
    are ``index`` (tied: a code in ``codes``; at a non-zero cut-off, below 2^32 elements)."""
    m = index.numel()
    out = torch.empty(m, dtype=torch.bool)
    drop = out.numpy()
    hasher = CodeHasher(seed, codes, min(_HASH_CHUNK, max(m, 1)))
    cut = np.uint32(min(hash_cut, _M32))
    for at in range(0, m, _HASH_CHUNK):
        part = index[at : at + _HASH_CHUNK].numpy()
        h = hasher.hashes(start + at, part.size)
        hit = hasher.tied(part)
        d = drop[at : at + part.size]
        np.bitwise_and(np.greater(h, cut, out=d), hit, out=d)
        if hash_cut <= _M32:  # entries at the cut's own hash: the index decides (global cuts: another tensor's entry)
            equal = np.flatnonzero(np.bitwise_and(np.equal(h, cut, out=hasher.scratch[: part.size]), hit, out=hasher.scratch[: part.size]))
            d[equal] = equal + (start + at) > index_cut
    return out


class WindowCut:
    """Where the ``need``-th of a task's ``tied`` entries (the elements whose code is one of
    ``codes``) lies in hash order, in one pass over its codes by runs of consecutive elements
    (``feed``); below 2^32 elements, where hashes are distinct.

    The hashes are a bijection of the indices, independent of which entries tie: the cut's
    hash is about need/tied of the way through [0, 2^32), within a few sqrt(tied) entries.
    The pass hashes every element (``CodeHasher``), counts the tied entries below a window of
    ±``_WINDOW_SIGMAS`` standard deviations (plus ``_WINDOW_SLACK`` entries) around that
    guess, marks those above it as dropped, and keeps the few inside; ``finish`` sorts these
    and returns the cut, or None when it lies outside the window."""

    def __init__(self, seed: int, codes: Sequence[int], tied: int, need: int, chunk: int) -> None:
        self.tied, self.need = tied, need
        q = need / tied
        half = _WINDOW_SIGMAS * math.sqrt(tied * q * (1 - q)) + _WINDOW_SLACK
        self.low = np.uint32(math.floor(max(0.0, need - half) / tied * (1 << 32)))
        self.high = np.uint32(min(math.ceil(min(float(tied), need + half) / tied * (1 << 32)), _M32))
        self.hasher = CodeHasher(seed, codes, chunk)
        self.at_or_above = 0  # tied entries at or above the window's low end
        # those inside the window: flat indices and hashes, each in one growing buffer (a small
        # array per run, living through the pass, split the heap's freed blocks: 6.7 GiB kept
        # for one 1 B-element tensor of 8 tasks)
        self.inside = array("q")
        self.inside_hash = array("I")  # uint32 (C unsigned int)

    def feed(self, start: int, index: torch.Tensor, dropped: torch.Tensor) -> None:
        """Codes of the elements from flat index ``start`` (at most ``chunk``): ``dropped``
        (bool, as many) gets the tied entries above the window."""
        codes = index.numpy()
        m = codes.size
        h = self.hasher.hashes(start, m)
        hit = self.hasher.tied(codes)
        np.bitwise_and(hit, np.greater_equal(h, self.low, out=self.hasher.scratch[:m]), out=hit)
        self.at_or_above += int(np.count_nonzero(hit))
        d = dropped.numpy()
        np.bitwise_and(np.greater(h, self.high, out=d), hit, out=d)
        where = np.flatnonzero(np.bitwise_xor(hit, d, out=hit))  # tied, inside the window
        if where.size:
            self.inside_hash.frombytes(h[where].tobytes())
            self.inside.frombytes((where + start).astype(np.int64).tobytes())

    def finish(self) -> tuple[int, int, torch.Tensor] | None:
        """(hash cut, its entry's flat index, the entries inside the window past the cut, int64),
        or None when the cut is not inside the window."""
        rank = self.need - (self.tied - self.at_or_above)
        if not 1 <= rank <= len(self.inside_hash):
            return None
        inside_hash, inside = np.frombuffer(self.inside_hash, dtype=np.uint32), np.frombuffer(self.inside, dtype=np.int64)
        order = np.argsort(inside_hash, kind="stable")
        at = int(order[rank - 1])
        return int(inside_hash[at]), int(inside[at]), torch.from_numpy(inside[order[rank:]].astype(np.int64))


def split_ties(c: CodedTensor, trim: Trim, t: int, start: int = 0) -> tuple[CodedTensor, torch.Tensor]:
    """Task t's codes (of elements from flat index ``start``) with the tied entries the trim
    drops moved to a code the trim does not keep, and which codes of the result are kept
    (|value| >= threshold).

    Where a dropped entry goes: to the table's first code of a smaller |value| (the merged
    value of an entry that task t does not keep does not depend on t's value, so the lookup
    table keeps its size and gives the same bytes), else to a copy of its code (same value,
    never kept). The dropped entries are ``trim.dropped[t]`` when the trim has them, else the
    tied entries ``dropped_ties`` picks."""
    mag = c.table.abs()
    keep = mag >= trim.thresholds[t]
    if trim.hash_cut[t] >= ALL_TIES or float(trim.thresholds[t]) == 0.0:  # zeros: no value changes (``Trim.merge_mask``)
        return c, keep
    tied_codes = torch.nonzero(mag == trim.thresholds[t]).squeeze(1)
    if not tied_codes.numel():  # global scope: the cut-off value lies in other tensors
        return c, keep
    known = trim.dropped_in(t, start, start + c.index.numel())
    if known is not None:
        drop = known
    elif c.index.device.type == "cpu" and start + c.index.numel() <= _HASHED_MAX:
        drop = hashed_dropped(c.index, start, tied_codes.tolist(), trim.seeds[t], trim.hash_cut[t], trim.index_cut[t])
    else:
        where = tied_entries(c, tied_codes)
        drop = where[dropped_ties(where + start, trim.seeds[t], trim.hash_cut[t], trim.index_cut[t], float(trim.thresholds[t]))]
    spare = torch.nonzero(~keep).squeeze(1)
    if spare.numel():
        if drop.dtype == torch.bool and c.index.device.type == "cpu":
            return CodedTensor(c.table, moved_codes(c.index, drop, int(spare[0]))), keep
        index = c.index.clone()
        if drop.dtype == torch.bool:
            index.masked_fill_(drop, int(spare[0]))
        else:
            index[drop] = int(spare[0])
        return CodedTensor(c.table, index), keep
    copy_of = torch.full((c.values,), -1, dtype=torch.int64)
    copy_of[tied_codes] = torch.arange(c.values, c.values + tied_codes.numel())
    index = c.index.to(torch.int32)
    index[drop] = copy_of[index[drop].long()].to(torch.int32)
    table = torch.cat([c.table, c.table[tied_codes]])
    return CodedTensor(table, index), torch.cat([keep, torch.zeros(tied_codes.numel(), dtype=torch.bool)])


def majority_matters(coded: list[CodedTensor], keep: torch.Tensor) -> bool:
    """Whether the majority sign can change a merged value: only where the trimmed sum is
    exactly 0 and some task keeps its entry (with none kept, the disjoint mean is +0.0 for
    either sign). When it cannot, any sign gives the same lookup table, and the histogram of
    the moved combinations need not be counted again."""
    combos = combination_values(coded)
    return bool(((trimmed_sum(combos, keep) == 0) & keep.any(dim=0)).any())


def moved_joint(joint: torch.Tensor, coded: list[CodedTensor], trim: Trim, done: Collection[int] = ()) -> tuple[list[torch.Tensor], bool] | None:
    """``split_ties`` on the joint index (``joint_index`` of ``coded``, changed in place) when
    every task's dropped entries are known as a bool mask (``Trim.dropped``, as ``coded_trim``
    finds them) and move to a code of smaller |value|: each dropped entry's combination moves
    by (spare - code)·stride, a few vector operations a chunk at a time instead of a copy of
    the codes and a new joint index. Returns each task's kept codes and whether any entry
    moved; None (nothing changed) when a task's drops are not known so, or have nowhere to go.
    Tasks in ``done`` moved already (``coded_trim`` with the joint index)."""
    keeps: list[torch.Tensor] = []
    moves: list[tuple[np.ndarray, np.ndarray, int, int]] = []
    stride = combination_count(coded)
    for t, c in enumerate(coded):
        stride //= c.values
        mag = c.table.abs()
        keep = mag >= trim.thresholds[t]
        keeps.append(keep)
        if t in done or trim.hash_cut[t] >= ALL_TIES or float(trim.thresholds[t]) == 0.0 or not bool((mag == trim.thresholds[t]).any()):
            continue  # nothing moves (``split_ties``), or it has moved
        drop = trim.dropped.get(t)
        spare = torch.nonzero(~keep).squeeze(1)
        if drop is None or drop.dtype != torch.bool or not spare.numel() or c.index.device.type != "cpu":
            return None
        moves.append((c.index.numpy(), drop.numpy().view(np.uint8), int(spare[0]), stride))
    if moves:
        flat = joint.numpy()
        delta = np.empty(min(_HASH_CHUNK, flat.size), dtype=np.int32)
        for start in range(0, flat.size, _HASH_CHUNK):
            part = flat[start : start + _HASH_CHUNK]
            d = delta[: part.size]
            for codes, drop_bytes, spare_code, step in moves:
                np.subtract(np.int32(spare_code), codes[start : start + _HASH_CHUNK], out=d, dtype=np.int32)
                np.multiply(d, drop_bytes[start : start + _HASH_CHUNK], out=d)
                np.multiply(d, np.int32(step), out=d)
                np.add(part, d, out=part)
    return keeps, bool(moves)


def moved_codes(index: torch.Tensor, drop: torch.Tensor, spare: int) -> torch.Tensor:
    """``index`` with the elements of the bool mask ``drop`` set to ``spare``: index - drop·(index -
    spare) in the codes' own wrapping integers (three vector operations; a masked fill of a
    scattered mask mispredicts its branches and costs several times more)."""
    out = torch.empty_like(index)
    codes, moved = index.numpy(), out.numpy()
    np.subtract(codes, codes.dtype.type(spare), out=moved)
    np.multiply(moved, drop.numpy().view(np.uint8), out=moved, casting="unsafe")
    np.subtract(codes, moved, out=moved)
    return out


def combination_keep(keeps: list[torch.Tensor]) -> torch.Tensor:
    """``[T, V_0·…·V_{T-1}]`` bool: whether task t keeps its entry in each combination."""
    grids = torch.meshgrid(*keeps, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids])
