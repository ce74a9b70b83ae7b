"""TIES's whole-model pre-pass (``scope=global``) from code histograms, where the inputs are packs.

The global top-k needs, per task, the k-th largest |τ̂| over the whole model, where the top k
ends among the entries tied at it, and the majority sign. From a pack every tensor's τ̂ takes
the values of a small table, so one pass of code histograms (no value decoded) gives the
exact cut-off and its counts, where the streamed radix select (``tvq.merge.ops.global_select``)
takes two passes over decoded values; the tie-break then reads only the tensors that hold
entries tied at a cut-off, and the vote and the entries kept come from the compiled loop
(``tvq.merge.ties_kernel``) and the histograms. Tensors a pack stores exactly (norms, biases)
are counted from their values. The numbers are the dense pre-pass's, exactly.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from tvq.merge import ties_kernel
from tvq.merge.blocks import model_parts, tensor_parts
from tvq.merge.coded import weighted_kth_largest
from tvq.merge.ops import ALL_TIES, Trim, _zero_rank
from tvq.merge.registry import Parts
from tvq.merge.source import TaskSource
from tvq.quant.coded import CodedTensor

DENSE_MAX = 1 << 24  # exactly stored elements per task counted by value; beyond, the dense select is the cheaper


class ModelCounts:
    """Per task, the model's |τ̂| values with how many entries take each, row by row (a tensor,
    or a block of a large one), and the tensor each row belongs to.

    Each task's rows share one growing buffer (``array.array``): thousands of small tensors
    living through the pass split the heap's freed blocks, which then could not be reused
    (4-task TVQ4 pack of the 1.1B Llama: 1.34 GiB resident after the pass, 0.21 GiB with the
    buffers; ``tvq.heap``)."""

    def __init__(self, tasks: int) -> None:
        self._values = [array("f") for _ in range(tasks)]  # float32, as the tables
        self._counts = [array("q") for _ in range(tasks)]
        self._ends: list[list[int]] = [[] for _ in range(tasks)]  # per task, where each row ends
        self.keys: list[str] = []  # the tensor of each row (rows are added for every task at once)

    def add(self, key: str, rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One row per task: (values, counts)."""
        for t, (values, counts) in enumerate(rows):
            self._values[t].frombytes(values.to(torch.float32).numpy().tobytes())
            self._counts[t].frombytes(counts.to(torch.int64).numpy().tobytes())
            self._ends[t].append(len(self._values[t]))
        self.keys.append(key)

    def task(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Task t's values and counts, every row (views of its buffers)."""
        return np.frombuffer(self._values[t], dtype=np.float32), np.frombuffer(self._counts[t], dtype=np.int64)

    def _per_row(self, t: int, threshold: torch.Tensor) -> np.ndarray:
        """Task t's entries equal to ``threshold``, row by row."""
        values, counts = self.task(t)
        summed = np.concatenate(([0], np.cumsum(np.where(values == np.float32(float(threshold)), counts, 0))))
        ends = np.asarray(self._ends[t], dtype=np.int64)
        return summed[ends] - summed[np.concatenate(([0], ends[:-1]))]

    def select(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``global_select``'s answer for a count ``k`` (1 <= k < entries): per task the k-th
        largest |τ̂|, how many entries equal to it the top k takes, and how many there are."""
        found, need, tied = [], [], []
        for t in range(len(self._values)):
            v, c = (torch.from_numpy(a) for a in self.task(t))
            value = weighted_kth_largest(v, c, k)
            found.append(value)
            need.append(k - int(c[v > value].sum()))
            tied.append(int(c[v == value].sum()))
        return torch.stack(found), torch.tensor(need), torch.tensor(tied)

    def tied_per_key(self, t: int, threshold: torch.Tensor) -> dict[str, int]:
        """Task t's entries equal to ``threshold``, per tensor holding any."""
        out: dict[str, int] = {}
        for key, tied in zip(self.keys, self._per_row(t, threshold).tolist(), strict=True):
            if tied:
                out[key] = out.get(key, 0) + tied
        return out

    def one_tensor_cuts(self, thresholds: torch.Tensor, need: dict[int, int]) -> dict[str, dict[int, tuple[int, int]]]:
        """The tasks of ``need`` whose tie cut lies in one known tensor, by tensor: task ->
        (its rank among that tensor's tied entries, how many it has). At a non-zero cut-off
        the tied entries must all be in one tensor (the hash order interleaves tensors); at a
        cut-off of 0 the order is (tensor name, index), so the counts say which tensor holds
        the cut (``_zero_rank``)."""
        out: dict[str, dict[int, tuple[int, int]]] = {}
        for t, rank in need.items():
            per_key = self.tied_per_key(t, thresholds[t])
            if float(thresholds[t]) == 0:
                key, rank = _zero_rank(per_key, rank)
            elif len(per_key) == 1:
                key = next(iter(per_key))
            else:
                continue
            out.setdefault(key, {})[t] = (rank, per_key[key])
        return out

    def tied_keys(self, thresholds: torch.Tensor, tasks: Sequence[int]) -> set[str]:
        """The tensors holding an entry equal to a cut-off of one of ``tasks``: the only ones a tie-break reads."""
        return {key for t in tasks for key in self.tied_per_key(t, thresholds[t])}


def model_counts(source: TaskSource, progress: bool = False) -> ModelCounts | None:
    """Every task's histogram of |τ̂| over the model in one pass (codes: a bincount each); None
    when the inputs are not packs, or too many entries are stored exactly."""
    if not source.has_codes():
        return None
    out = ModelCounts(len(source.tasks))
    dense = 0
    for key, _, part in model_parts(source, desc="ties: global top-k (code histograms)", progress=progress):
        if isinstance(part, list):
            out.add(key, [(c.table.abs(), torch.bincount(c.index, minlength=c.values)) for c in part])
            continue
        dense += part.shape[1]
        if dense > DENSE_MAX:
            return None
        out.add(key, [torch.unique(row.abs(), return_counts=True) for row in part])
    return out


def key_parts(source: TaskSource, key: str, block: int | None = None) -> Parts:
    """Fresh passes over one tensor's parts (``BlockPasses.parts``, for a tie cut from codes):
    ``tensor_parts``, a dense block as its rows."""

    def passes() -> Iterator[list[CodedTensor | torch.Tensor]]:
        for _, part in tensor_parts(source, key, block):
            yield list(part)

    return passes


def coded_block_votes(coded: list[CodedTensor], start: int, trim: Trim, kept: torch.Tensor) -> int:
    """``block_votes`` of a coded block (flat indices from ``start``): Σ of its elected signs,
    and the entries each task keeps (``Trim.mask``, zeros included) added to ``kept``: those
    above the cut-off from the histogram, the tied ones kept all (keep_ties), by the compiled
    loop's hash test, or at a cut-off of 0 in index order up to the trim's index cut."""
    code_trim = ties_kernel.CodeTrim.of(coded, trim)
    hashed_kept = np.zeros(len(coded), dtype=np.int64)
    votes = ties_kernel.coded_votes(coded, code_trim, start, hashed_kept)
    for t, c in enumerate(coded):
        mag, thr = c.table.abs(), trim.thresholds[t]
        counts = torch.bincount(c.index, minlength=c.values)
        tied_codes = mag == thr
        if trim.hash_cut[t] >= ALL_TIES:
            tied = int(counts[tied_codes].sum())
        elif float(thr) != 0:
            tied = int(hashed_kept[t])
        else:  # zeros, in index order: those up to the cut
            upto = max(0, min(c.index.numel(), trim.index_cut[t] - start + 1))
            tied = int(tied_codes[c.index[:upto].long()].sum()) if upto else 0
        kept[t] += int(counts[mag > thr].sum()) + tied
    return votes
