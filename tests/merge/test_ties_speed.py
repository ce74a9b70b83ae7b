"""TIES's exact tie rule, fast (issue 19): the tied entries of a task are found and hashed once
per tensor (``Trim.dropped``), the hash-order cut is a radix select, dropped coded entries move
to a code the task does not keep (so a 4-task RTVQ B3O2 lookup table stays at 2^20 entries and
merges from codes), and the by-blocks path marks the dropped entries in its tie-cut pass. Every
one of these must keep exactly the entries the rule picks: the kept sets are checked against a
brute-force order (|τ| descending, hash, index) and the bytes against the dense path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvq.merge.methods import ties as ties_module
from tvq.merge.methods.ties import (
    CodeHasher,
    Ties,
    TiesOptions,
    WindowCut,
    coded_tie_cuts,
    coded_tied_cut,
    coded_trim,
    hashed_dropped,
    moved_codes,
    split_ties,
    tied_entries,
)
from tvq.merge.ops import (
    ALL_TIES,
    Trim,
    bits_between,
    dropped_ties,
    element_hash,
    hash_order_cut,
    keep_count,
    mark_bits,
    row_trim,
    tie_cuts,
    tie_seed,
    tied_cut,
)
from tvq.quant.coded import CodedTensor


def _coded(seed: int, n: int, bits: int, symmetric: bool = True) -> CodedTensor:
    """A b-bit τ̂ of ``n`` entries, peaked at 0 like real task vectors (most entries on a few
    codes: huge tie sets); ``symmetric`` grids have ±v codes (two codes tie at a cut-off)."""
    g = torch.Generator().manual_seed(seed)
    v = 1 << bits
    table = (torch.arange(v) - (v - 1) / 2 if symmetric else torch.arange(v) - v // 2).float() * 0.003
    weights = torch.exp(-((table / 0.004) ** 2)) + 1e-3
    index = torch.multinomial(weights, n, replacement=True, generator=g).to(torch.uint8)
    return CodedTensor(table, index)


def _expected_keep(values: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The first k entries by |τ| descending, then hash (index order at a cut-off of 0), then index."""
    n = values.numel()
    mag = values.abs()
    hashes = torch.where(mag == 0, 0, element_hash(seed, torch.arange(n)))
    order = torch.arange(n)
    for key in (torch.arange(n), hashes, -mag.double()):  # least significant first, stable sorts
        order = order[torch.sort(key[order], stable=True).indices]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("chunk", [1 << 20, 2000])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_chunked_coded_cut_is_the_cut_of_the_tied_entries(monkeypatch, chunk: int, symmetric: bool) -> None:
    monkeypatch.setattr(ties_module, "_CUT_CHUNK", chunk)
    c = _coded(1, 12_011, 4, symmetric)
    seed = tie_seed("a", "w")
    mag = c.table.abs()
    for code in torch.argsort(torch.bincount(c.index, minlength=c.values), descending=True)[:5].tolist():
        codes = torch.nonzero(mag == mag[code]).squeeze(1)
        tied = tied_entries(c, codes)
        if not 1 < tied.numel() < c.index.numel() or float(mag[code]) == 0:  # (a cut-off of 0: index order, unhashed)
            continue
        for need in sorted({1, 2, tied.numel() // 3, tied.numel() - 1}):
            cut, index, _ = tied_cut(tied, seed, float(mag[code]), need, c.index.numel())
            got_cut, got_index, got_dropped = coded_tied_cut(c, codes, seed, float(mag[code]), need)
            assert (got_cut, got_index) == (cut, index)
            assert got_dropped is not None
            expected = tied[dropped_ties(tied, seed, cut, index, float(mag[code]))]
            assert torch.equal(torch.nonzero(got_dropped).squeeze(1), expected)
            assert int(got_dropped.sum()) == tied.numel() - need


def test_the_radix_hash_cut_is_the_kthvalue_cut_even_with_repeated_hashes(monkeypatch) -> None:
    g = torch.Generator().manual_seed(3)
    hashes = torch.randint(0, 1 << 32, (200_000,), generator=g)
    hashes[::7] = hashes[1]  # many entries share one hash: the index decides among them
    index = torch.sort(torch.randperm(1 << 22, generator=g)[:200_000]).values
    for need in (1, 29, 100_000, 199_999, 200_000):
        radix = hash_order_cut(hashes, index, need)
        monkeypatch.setattr("tvq.merge.ops._RADIX_MIN", 1 << 40)
        assert hash_order_cut(hashes, index, need) == radix
        monkeypatch.undo()
        cut, at = radix
        before = int((hashes < cut).sum()) + int(((hashes == cut) & (index <= at)).sum())
        assert before == need


def test_packed_marks_roundtrip() -> None:
    bits = torch.zeros(13, dtype=torch.uint8)
    marked = torch.tensor([0, 3, 7, 8, 9, 63, 64, 100, 103])
    mark_bits(bits, marked)
    for start, end in ((0, 104), (3, 9), (5, 101), (64, 65), (100, 104)):
        want = torch.zeros(end - start, dtype=torch.bool)
        inside = marked[(marked >= start) & (marked < end)] - start
        want[inside] = True
        assert torch.equal(bits_between(bits, start, end), want), (start, end)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.6])
def test_dense_trims_remember_their_dropped_entries_and_mask_alike(density: float) -> None:
    """``row_trim`` keeps the dropped tied entries (``Trim.dropped``): its masks, whole and in
    chunks, are the masks found by hashing the tied entries again, and the brute-force top k."""
    taus = torch.stack([_coded(s, 20_000, b).table[_coded(s, 20_000, b).index.long()] for s, b in ((1, 4), (2, 2), (3, 3))])
    seeds = [tie_seed(t, "w") for t in ("a", "b", "c")]
    trim = row_trim(taus, density, seeds, "exact")
    bare = Trim(trim.thresholds, trim.hash_cut, trim.index_cut, trim.seeds, trim.kept)
    k = keep_count(density, taus.shape[1])
    for t in range(3):
        assert torch.equal(trim.mask(taus)[t], _expected_keep(taus[t], k, seeds[t]))
    for start in range(0, taus.shape[1], 3_001):
        part = taus[:, start : start + 3_001]
        assert torch.equal(trim.mask(part, start), bare.mask(part, start))
        assert torch.equal(trim.merge_mask(part, start), bare.merge_mask(part, start))
    for t in range(3):  # remembered where hashed (a cut-off of 0 takes zeros in index order, unhashed)
        hashed = trim.hash_cut[t] < ALL_TIES and float(trim.thresholds[t]) != 0
        assert (t in trim.dropped) == hashed
    assert any(t in trim.dropped for t in range(3))


@pytest.mark.parametrize("density", [0.05, 0.2])
def test_coded_trims_keep_the_brute_force_top_k_and_split_without_growing_the_table(density: float) -> None:
    coded = [_coded(s, 50_000, b, symmetric=s != 2) for s, b in ((1, 4), (2, 4), (3, 3))]
    seeds = [tie_seed(t, "w") for t in ("a", "b", "c")]
    counts = [torch.bincount(c.index, minlength=c.values) for c in coded]
    trim = coded_trim(coded, counts, density, seeds, "exact")
    k = keep_count(density, 50_000)
    for t, c in enumerate(coded):
        values = c.table[c.index.long()]
        expected = _expected_keep(values, k, seeds[t])
        moved, keep = split_ties(c, trim, t)
        assert moved.values == c.values  # a code of smaller |value| takes the dropped entries
        assert torch.equal(keep[moved.index.long()], expected)
        assert torch.equal(moved.table[moved.index.long()][expected], values[expected])
        for start in (0, 1_000, 49_999):  # a block's split reads the trim's marks from its start
            part = CodedTensor(c.table, c.index[start:])
            assert torch.equal(keep[split_ties(part, trim, t, start)[0].index.long()], expected[start:])
        assert trim.hash_cut[t] < ALL_TIES


def test_a_table_without_a_smaller_code_gets_copies_of_the_tied_codes() -> None:
    c = CodedTensor(torch.tensor([0.5, -0.5, 1.0]), torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 0, 1], dtype=torch.uint8))
    seed = tie_seed("a", "w")
    trim = coded_trim([c], [torch.bincount(c.index, minlength=3)], 0.5, [seed], "exact")
    moved, keep = split_ties(c, trim, 0)
    assert moved.values == 5 and keep.tolist() == [True, True, True, False, False]
    assert torch.equal(keep[moved.index.long()], _expected_keep(c.table[c.index.long()], 5, seed))


def test_a_4_task_rtvq_b3o2_tensor_merges_from_codes_with_the_dense_bytes() -> None:
    """32 values per task: 32^4 = 2^20 combinations, the largest table; copies of the tied codes
    used to make it larger, and the tensor fell back to the (much slower) dense path."""
    n = (1 << 20) + 4_099
    coded = []
    for s in range(4):
        c = _coded(10 + s, n, 5)
        coded.append(CodedTensor(c.table * (1 + 0.1 * s), c.index))
    tasks = ["t0", "t1", "t2", "t3"]
    for options in ({"scope": "tensor"}, {"scope": "tensor", "density": 0.05, "aggregate": "sum"}):
        method = Ties(TiesOptions(**options), tasks)
        got = method.merge_coded("w", coded)
        assert got is not None
        dense = Ties(TiesOptions(**options), tasks).merge_tensor("w", torch.stack([c.table[c.index.long()] for c in coded]))
        assert torch.equal(got, dense.reshape(-1))


def test_one_tensors_tie_cut_marks_the_entries_it_drops() -> None:
    """``tie_cuts`` over one tensor's blocks marks exactly the entries ``dropped_ties`` drops."""
    taus = torch.stack([_coded(s, 30_000, 3).table[_coded(s, 30_000, 3).index.long()] for s in (4, 5)])
    seeds = [tie_seed(t, "w") for t in ("a", "b")]
    whole = row_trim(taus, 0.2, seeds, "exact")
    thresholds = whole.thresholds
    need = {t: int(keep_count(0.2, 30_000) - (taus[t].abs() > thresholds[t]).sum()) for t in range(2)}

    def stream(keys):
        return iter([("w", s, taus[:, s : s + 7_000]) for s in range(0, 30_000, 7_000)])

    marks = {t: torch.zeros((30_000 + 7) // 8, dtype=torch.uint8) for t in range(2)}
    cuts = tie_cuts(stream, lambda t, key: seeds[t], thresholds, need, marks)
    for t in range(2):
        assert cuts[t][0] == whole.hash_cut[t] and cuts[t][2] == whole.index_cut[t]
        assert torch.equal(torch.nonzero(bits_between(marks[t], 0, 30_000)).squeeze(1), whole.dropped[t].long())


@pytest.mark.parametrize("symmetric", [True, False])
def test_tie_cuts_across_tensors_from_codes_are_the_dense_cuts(symmetric: bool) -> None:
    """Global TIES's tie-break over several tensors reads the tasks' codes (``tied_at``), not fp32
    copies: the same (hash, tensor, index) cuts as from the dense blocks, at a non-zero cut-off
    and at 0 (index order), with a block that mixes coded and dense parts."""
    keys = ["a.weight", "b.weight", "c.weight"]
    coded = {key: [_coded(7 * i + t, 20_000 + 1_000 * i, 3, symmetric) for t in range(3)] for i, key in enumerate(keys)}
    dense = {key: torch.stack([c.table[c.index.long()] for c in parts]) for key, parts in coded.items()}
    seeds = {(t, key): tie_seed(f"t{t}", key) for t in range(3) for key in keys}
    table = coded[keys[0]][0].table
    thresholds = torch.stack([table.abs()[1], table.abs()[0], table.abs().min()])  # the last one: 0 on the asymmetric grid
    tied = [sum(int((dense[key][t].abs() == thresholds[t]).sum()) for key in keys) for t in range(3)]
    need = {t: max(1, tied[t] * (t + 1) // 5) for t in range(3) if tied[t]}

    def stream(blocks):
        def one_pass(wanted):
            for key in keys:
                if wanted is None or key in wanted:
                    for start in range(0, dense[key].shape[1], 6_000):
                        yield key, start, blocks(key, start, start + 6_000)

        return one_pass

    def from_codes(key, start, end):
        parts = [CodedTensor(c.table, c.index[start:end]) for c in coded[key]]
        return parts if key != "b.weight" else [parts[0], dense[key][1, start:end], parts[2]]  # a task read from a checkpoint

    expected = tie_cuts(stream(lambda key, start, end: dense[key][:, start:end]), lambda t, key: seeds[t, key], thresholds, need)
    got = tie_cuts(stream(from_codes), lambda t, key: seeds[t, key], thresholds, need)
    assert got == expected and set(got) == set(need)
    assert (float(thresholds[2]) == 0) == (not symmetric)


# --- issue 19, part 2: the one-pass cuts (``WindowCut``, NumPy hashes) give the radix cut's bytes


@pytest.mark.parametrize("seed", [0, 0xFFFFFFFF, 12_345_678_901_234_567, (1 << 64) - 1])
def test_the_numpy_hasher_is_element_hash(seed: int) -> None:
    for chunk in (1 << 16, 1_000, 7):
        hasher = CodeHasher(seed, [0], chunk)
        for start in (0, 1 << 16, 3 << 16, 123, 1 << 20, (1 << 32) - chunk):  # aligned runs take a shortcut
            for m in sorted({chunk, chunk // 2 + 1, 1}):
                got = hasher.hashes(start, m).astype(np.int64)
                assert np.array_equal(got, element_hash(seed, torch.arange(start, start + m)).numpy()), (chunk, start, m)


def _cut_cases(c: CodedTensor):
    """(codes, threshold, need) for the most frequent codes' |values| and a few needs each."""
    mag = c.table.abs()
    for code in torch.argsort(torch.bincount(c.index, minlength=c.values), descending=True)[:5].tolist():
        codes = torch.nonzero(mag == mag[code]).squeeze(1)
        tied = tied_entries(c, codes)
        if not 1 < tied.numel() < c.index.numel() or float(mag[code]) == 0:
            continue
        for need in sorted({1, 2, tied.numel() // 3, tied.numel() // 2, tied.numel() - 1}):
            yield codes, tied, float(mag[code]), need


@pytest.mark.parametrize("chunk", [1 << 16, 1_000])
@pytest.mark.parametrize("window", ["guessed", "missed"])
def test_the_window_cut_is_the_radix_cut(monkeypatch, chunk: int, window: str) -> None:
    """One pass with a guessed window, or (a window that misses the cut) the radix fallback:
    the same cut and the same dropped entries as ``tied_cut`` over the tied entries."""
    monkeypatch.setattr(ties_module, "_HASH_CHUNK", chunk)
    if window == "missed":
        monkeypatch.setattr(ties_module.WindowCut, "finish", lambda self: None)
    for symmetric in (True, False):
        c = _coded(7, 40_013, 4, symmetric)
        seed = tie_seed("a", "w")
        for codes, tied, threshold, need in _cut_cases(c):
            cut, index, _ = tied_cut(tied, seed, threshold, need, c.index.numel())
            got_cut, got_index, got_dropped = coded_tied_cut(c, codes, seed, threshold, need)
            assert (got_cut, got_index) == (cut, index)
            assert got_dropped is not None and got_dropped.dtype == torch.bool
            assert torch.equal(torch.nonzero(got_dropped).squeeze(1), tied[dropped_ties(tied, seed, cut, index, threshold)])


def test_a_narrow_window_still_finds_or_refuses_the_cut(monkeypatch) -> None:
    """With no slack the window often misses: ``finish`` must then say so, never guess."""
    monkeypatch.setattr(ties_module, "_WINDOW_SIGMAS", 0.0)
    monkeypatch.setattr(ties_module, "_WINDOW_SLACK", 1)
    c = _coded(8, 30_011, 3)
    seed = tie_seed("b", "w")
    outcomes = set()
    for codes, tied, threshold, need in _cut_cases(c):
        window = WindowCut(seed, codes.tolist(), tied.numel(), need, 4_096)
        dropped = torch.empty(c.index.numel(), dtype=torch.bool)
        for start in range(0, c.index.numel(), 4_096):
            window.feed(start, c.index[start : start + 4_096], dropped[start : start + 4_096])
        found = window.finish()
        outcomes.add(found is not None)
        if found is not None:
            cut, index, _ = tied_cut(tied, seed, threshold, need, c.index.numel())
            assert found[:2] == (cut, index)
    assert outcomes == {True, False}


@pytest.mark.parametrize("hash_cut_at", [0.0, 0.3, 0.9])
def test_hashed_dropped_is_dropped_ties_with_any_index_cut(hash_cut_at: float) -> None:
    """The split of a block without marks (global cuts, or marks over ``MARK_BYTES``) hashes in
    NumPy: entries at the cut's own hash are kept or dropped by the index cut, as ``dropped_ties``."""
    c = _coded(9, 20_000, 4)
    seed = tie_seed("c", "w")
    codes = torch.tensor([5, 10])
    tied = tied_entries(c, codes)
    hashes = element_hash(seed, tied)
    cut_entry = int(torch.argsort(hashes)[int(hash_cut_at * (tied.numel() - 1))])
    cut, at = int(hashes[cut_entry]), int(tied[cut_entry])
    for index_cut in (-1, at - 1, at, at + 1, (1 << 62) - 1):
        for start in (0, 777, 12_345):
            part = c.index[start:]
            expected = torch.zeros(part.numel(), dtype=torch.bool)
            inside = tied[tied >= start]
            expected[inside[dropped_ties(inside, seed, cut, index_cut)] - start] = True
            assert torch.equal(hashed_dropped(part, start, codes.tolist(), seed, cut, index_cut), expected), (index_cut, start)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_moved_codes_is_a_masked_fill(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    index = torch.randint(0, 32, (10_001,), generator=g).to(dtype)
    drop = torch.rand(10_001, generator=g) < 0.3
    for spare in (0, 3, 31):
        assert torch.equal(moved_codes(index, drop, spare), index.clone().masked_fill_(drop, spare))


@pytest.mark.parametrize("block", [8_000, 1_000, 4_104])
def test_coded_tie_cuts_by_blocks_are_tie_cuts_with_the_same_marks(block: int) -> None:
    """A tensor read by blocks of codes: one pass gives ``tie_cuts``'s cuts (non-zero cut-offs,
    and a cut-off of 0 in index order) and its marks."""
    n = 30_000
    coded = [_coded(s, n, b) for s, b in ((11, 3), (12, 4), (13, 2))]
    coded.append(CodedTensor(torch.tensor([0.0, 0.5]), (torch.rand(n, generator=torch.Generator().manual_seed(5)) < 0.1).to(torch.uint8)))
    taus = torch.stack([c.table[c.index.long()] for c in coded])
    seeds = [tie_seed(t, "w") for t in ("a", "b", "c", "d")]
    whole = row_trim(taus, 0.2, seeds, "exact")
    need = {t: int(keep_count(0.2, n) - (taus[t].abs() > whole.thresholds[t]).sum()) for t in range(4)}
    tied = {t: int((taus[t].abs() == whole.thresholds[t]).sum()) for t in range(4)}
    need = {t: k for t, k in need.items() if k < tied[t]}
    assert float(whole.thresholds[3]) == 0 and 3 in need  # one task cut at 0

    def parts():
        return iter([[CodedTensor(c.table, c.index[s : s + block]) for c in coded] for s in range(0, n, block)])

    hashed = [t for t in need if float(whole.thresholds[t]) != 0]
    marks = {t: torch.zeros((n + 7) // 8, dtype=torch.uint8) for t in hashed}
    cuts = coded_tie_cuts(parts, need, tied, whole.thresholds, seeds, marks)
    assert cuts is not None
    for t in need:
        assert cuts[t] == (whole.hash_cut[t], whole.index_cut[t]), t
    for t in hashed:
        assert torch.equal(torch.nonzero(bits_between(marks[t], 0, n)).squeeze(1), whole.dropped[t].long())


@pytest.mark.parametrize("tables", ["shared", "scaled"])
def test_coded_exact_ties_recount_the_moved_combinations_only_when_the_majority_matters(monkeypatch, tables: str) -> None:
    """Tasks with the same table (``shared``) have kept entries that cancel (v + -v = 0): the
    majority sign then decides them and the moved joint histogram is counted again; with
    ``scaled`` tables no kept entries cancel and the first histogram's sign is as good."""
    n = 60_007
    coded = []
    for s in range(3):
        c = _coded(20 + s, n, 4)
        coded.append(CodedTensor(c.table * (1 if tables == "shared" else 1 + 0.1 * s), c.index))
    calls = []
    original = ties_module.majority_matters

    def spy(*args):
        calls.append(original(*args))
        return calls[-1]

    monkeypatch.setattr(ties_module, "majority_matters", spy)
    tasks = ["t0", "t1", "t2"]
    for options in ({"scope": "tensor"}, {"scope": "tensor", "aggregate": "sum", "lambda": -0.5}):
        got = Ties(TiesOptions(**options), tasks).merge_coded("w", coded)
        assert got is not None
        dense = Ties(TiesOptions(**options), tasks).merge_tensor("w", torch.stack([c.table[c.index.long()] for c in coded]))
        assert torch.equal(got, dense.reshape(-1))
    assert calls and all(calls) == (tables == "shared") and any(calls) == (tables == "shared")


@pytest.mark.parametrize("window", ["guessed", "missed"])
def test_coded_exact_ties_move_dropped_entries_in_the_joint_index(monkeypatch, window: str) -> None:
    """The whole-tensor coded path moves each task's dropped entries in the joint index as its
    cut is found (``JointMove``); when a window misses, the pass is undone and the radix cut
    moves them: the dense path's bytes either way."""
    monkeypatch.setattr(ties_module, "_HASH_CHUNK", 4_096)
    if window == "missed":
        monkeypatch.setattr(ties_module.WindowCut, "finish", lambda self: None)
    n = 50_021
    coded = [CodedTensor(_coded(30 + s, n, b).table * (1 + 0.1 * s), _coded(30 + s, n, b).index) for s, b in ((0, 4), (1, 3), (2, 4))]
    tasks = ["t0", "t1", "t2"]
    moved_sets = []
    original = ties_module.coded_trim

    def spy(*args):
        trim = original(*args)
        moved_sets.append(set(args[6]) if len(args) > 6 else None)
        return trim

    monkeypatch.setattr(ties_module, "coded_trim", spy)
    for density in (0.05, 0.2, 0.5):
        options = {"scope": "tensor", "density": density}
        got = Ties(TiesOptions(**options), tasks).merge_coded("w", coded)
        assert got is not None
        dense = Ties(TiesOptions(**options), tasks).merge_tensor("w", torch.stack([c.table[c.index.long()] for c in coded]))
        assert torch.equal(got, dense.reshape(-1)), density
    assert any(moved_sets)
