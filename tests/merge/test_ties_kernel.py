"""TIES from codes by the compiled loop (many tasks, no lookup table) gives the dense path's bytes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvq.merge import ties_kernel
from tvq.merge.coded import worth_coding
from tvq.merge.methods.ties import Ties
from tvq.quant.coded import CodedTensor

TASKS = [f"task{i}" for i in range(8)]


def _coded(g: torch.Generator, tasks: int, n: int, values: int, symmetric: bool, dtype: torch.dtype = torch.uint8) -> list[CodedTensor]:
    """Random codes over small tables: symmetric tables (±a) tie two codes at a cut-off, shared
    tables make trimmed sums cancel exactly (the majority sign decides those elements)."""
    out = []
    for t in range(tasks):
        if symmetric:
            half = torch.rand(values // 2, generator=g) * (t % 3 + 1) * 1e-3
            table = torch.cat([-half.flip(0), half])
        else:
            table = (torch.arange(values, dtype=torch.float32) - values // 2) * (1e-3 if t % 2 else 2e-3)
        index = torch.randint(0, values, (n,), generator=g).to(dtype)
        index[: n // 10] = values // 2  # a run of one code: many entries tied at it
        out.append(CodedTensor(table, index))
    return out


def _dense(coded: list[CodedTensor]) -> torch.Tensor:
    return torch.stack([c.table[c.index.long()] for c in coded])


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("options", [
    {"scope": "tensor"},
    {"scope": "tensor", "density": 0.5, "aggregate": "sum"},
    {"scope": "tensor", "tie_rule": "keep_ties"},
    {"scope": "tensor", "density": 0.9},
    {"scope": "tensor", "density": 0.0},
    {"scope": "tensor", "density": 1.0},
])  # fmt: skip
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("tasks", [5, 8])
def test_the_compiled_loop_gives_the_dense_bytes(options: dict, symmetric: bool, tasks: int, monkeypatch) -> None:
    monkeypatch.setattr(ties_kernel, "CHUNK", 4096)  # several chunks, on several threads
    g = torch.Generator().manual_seed(tasks * 2 + symmetric)
    coded = _coded(g, tasks, 20_000, 16, symmetric)
    assert not worth_coding(coded)
    used = []
    original = ties_kernel.coded_ties

    def spy(*args, **kwargs):
        used.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(ties_kernel, "coded_ties", spy)
    method = Ties(Ties.Options(**options), TASKS[:tasks])
    got = method.merge_coded("w", coded)
    expected = Ties(Ties.Options(**options), TASKS[:tasks]).merge_tensor("w", _dense(coded))
    assert used == [True]
    assert got is not None
    assert _digest(got) == _digest(expected.reshape(-1))


def test_elements_the_majority_decides_wait_for_it(monkeypatch) -> None:
    """τ_1 = −τ_0 exactly, and the other tasks are 0 on the second half: there the trimmed sum
    is exactly 0 with values kept, so the disjoint mean takes the tensor's majority sign (−,
    from the first half), which the loop knows only at the end."""
    monkeypatch.setattr(ties_kernel, "CHUNK", 1024)
    g = torch.Generator().manual_seed(0)
    table = torch.tensor([-2e-3, -1e-3, 0.0, 1e-3, 2e-3])
    n = 10_000
    first = torch.randint(0, 5, (n,), generator=g, dtype=torch.uint8)
    rest = torch.full((n,), 2, dtype=torch.uint8)
    rest[: n // 2] = 1
    coded = [CodedTensor(table, first), CodedTensor(table, (4 - first).to(torch.uint8))] + [CodedTensor(table, rest.clone()) for _ in range(4)]
    options = Ties.Options(scope="tensor", density=1.0)
    got = Ties(options, TASKS[:6]).merge_coded("w", coded)
    expected = Ties(options, TASKS[:6]).merge_tensor("w", _dense(coded))
    assert got is not None
    assert bool((got[n // 2 :] < 0).any())  # the majority's sign chose the negative value of τ_0 or τ_1
    assert _digest(got) == _digest(expected.reshape(-1))


@settings(max_examples=25, deadline=None)
@given(
    tasks=st.integers(3, 7),
    n=st.integers(1, 3000),
    values=st.sampled_from([2, 4, 16, 32]),
    density=st.sampled_from([0.05, 0.2, 0.5]),
    seed=st.integers(0, 2**16),
    wide=st.booleans(),
)
def test_the_compiled_loop_matches_on_any_shape(tasks: int, n: int, values: int, density: float, seed: int, wide: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    coded = _coded(g, tasks, n, values, symmetric=bool(seed % 2), dtype=torch.int16 if wide else torch.uint8)
    if worth_coding(coded):
        return  # the lookup table merges these
    options = Ties.Options(scope="tensor", density=density)
    got = Ties(options, TASKS[:tasks]).merge_coded("w", coded)
    expected = Ties(options, TASKS[:tasks]).merge_tensor("w", _dense(coded))
    assert got is not None
    assert _digest(got) == _digest(expected.reshape(-1))


def test_blocks_take_the_flat_index_from_their_start() -> None:
    """A block's tie cut is decided by the element's index in the tensor, not in the block."""
    g = torch.Generator().manual_seed(5)
    coded = _coded(g, 6, 8192, 16, symmetric=True)
    method = Ties(Ties.Options(scope="tensor"), TASKS[:6])
    whole = method.merge_coded("w", coded)
    assert whole is not None
    counts = [torch.bincount(c.index, minlength=c.values) for c in coded]
    from tvq.merge.methods.ties import coded_trim  # the whole tensor's trim, seen from each block
    from tvq.merge.ops import tie_seed

    trim = coded_trim(coded, counts, 0.2, [tie_seed(t, "w") for t in TASKS[:6]], "exact")
    majority = float(torch.sign(torch.tensor(float(ties_kernel.coded_votes(coded, ties_kernel.CodeTrim.of(coded, trim))))))
    pieces = []
    for start in range(0, 8192, 3000):
        part = [CodedTensor(c.table, c.index[start : start + 3000]) for c in coded]
        pieces.append(ties_kernel.coded_ties(part, ties_kernel.CodeTrim.of(part, trim), majority, True, start).mul_(0.3))
    assert _digest(torch.cat(pieces)) == _digest(whole)
