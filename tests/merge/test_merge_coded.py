"""Merging from codes (a lookup table per combination of codes) gives the dense path's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tvq import QuantizeOptions, quantize
from tvq.merge import load_task_vectors
from tvq.merge.coded import marginal_counts, weighted_kth_largest
from tvq.merge.engine import merge_state_dict
from tvq.merge.methods.ties import Ties
from tvq.merge.ops import kth_largest
from tvq.quant.coded import CodedTensor
from tvq.vector import TaskVector

PACKS = {
    "tvq4": QuantizeOptions(bits=4),
    "tvq2": QuantizeOptions(bits=2),
    "rtvq-b2o1-ec": QuantizeOptions(bits=1, base_bits=2, residual=True, error_correction=True),
}
METHODS = [("task_arithmetic", {}), ("average", {}), ("ties", {"scope": "tensor"}), ("ties", {"scope": "global", "density": 0.1}),
           ("ties", {"scope": "tensor", "aggregate": "sum", "density": 0.5})]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("coded")
    g = torch.Generator().manual_seed(3)
    pre = {"big": torch.randn(300, 400, generator=g), "wide": torch.randn(70_000, generator=g), "small": torch.randn(64, generator=g)}
    save_file(pre, d / "pre.safetensors")
    fts = {}
    for i in range(4):
        ft = {k: v + torch.randn(v.shape, generator=g) * 0.01 * (i + 1) for k, v in pre.items()}
        ft["wide"][:1000] = pre["wide"][:1000]  # exact zeros in τ: sign ties and a constant-free code
        fts[f"t{i}"] = d / f"t{i}.safetensors"
        save_file(ft, fts[f"t{i}"])
    packs = {}
    for name, options in PACKS.items():
        packs[name] = d / name
        quantize(d / "pre.safetensors", fts, packs[name], options, progress=False)
    return {"pre": d / "pre.safetensors", "packs": packs}


def _dense(vectors: dict[str, TaskVector]) -> dict[str, TaskVector]:
    """The same task vectors without their codes: the dense path."""
    return {n: TaskVector(list(tv), tv.__getitem__, n) for n, tv in vectors.items()}


@pytest.mark.parametrize("pack", list(PACKS))
@pytest.mark.parametrize(("method", "options"), METHODS)
def test_coded_merge_is_byte_identical_to_the_dense_one(inputs: dict, pack: str, method: str, options: dict, monkeypatch) -> None:
    pre, vectors = load_task_vectors(inputs["pre"], packs=[inputs["packs"][pack]])
    used: list[str] = []
    original = Ties.merge_coded

    def spy(self, key, coded):
        out = original(self, key, coded)
        if out is not None:
            used.append(key)
        return out

    monkeypatch.setattr(Ties, "merge_coded", spy)
    coded = merge_state_dict(method, pre, vectors, options)
    dense = merge_state_dict(method, pre, _dense(vectors), options)
    for key in dense:
        assert torch.equal(coded[key], dense[key]), key
    if method == "ties":
        assert "big" in used and "small" not in used  # small tensors: a table would be larger than the tensor


def test_weighted_kth_largest_is_the_kth_largest_of_the_expanded_multiset() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(16, generator=g).abs()
    values[3] = values[5]  # a tie between two table entries
    counts = torch.randint(0, 50, (16,), generator=g)
    expanded = torch.repeat_interleave(values, counts)
    for k in (1, 2, 17, int(counts.sum()) // 2, int(counts.sum())):
        assert weighted_kth_largest(values, counts, k) == kth_largest(expanded, k).squeeze()


def test_marginal_counts_are_each_tasks_code_histogram() -> None:
    g = torch.Generator().manual_seed(1)
    coded = [CodedTensor(torch.randn(v, generator=g), torch.randint(0, v, (5_000,), generator=g).to(torch.uint8)) for v in (4, 2, 8)]
    from tvq.merge.coded import joint_index

    joint = torch.bincount(joint_index(coded), minlength=64)
    for c, marginal in zip(coded, marginal_counts(joint, coded), strict=True):
        assert torch.equal(marginal, torch.bincount(c.index, minlength=c.values))


def test_coded_tensor_decodes_like_the_pack(inputs: dict) -> None:
    from tvq.pack.reader import open_pack

    for name in PACKS:
        pack = open_pack(inputs["packs"][name], inputs["pre"])
        c = pack.coded("t1", "big")
        assert torch.equal(c.table[c.index.long()].reshape(300, 400), pack.task_tensor("t1", "big"))


def test_fq_packs_have_no_codes_to_merge_from(tmp_path: Path, inputs: dict) -> None:
    from tvq.pack.reader import open_pack

    out = tmp_path / "fq"
    quantize(inputs["pre"], {"a": inputs["pre"]}, out, QuantizeOptions(bits=4, target="finetuned"), progress=False)
    assert open_pack(out, inputs["pre"]).coded("a", "big") is None


def test_eight_tasks_sum_in_task_order_on_every_path(tmp_path: Path) -> None:
    """From T = 8 on torch's sum(dim=0) changes its order with the tensor size; tvq adds in task order."""
    from tvq.merge.ops import task_sum

    g = torch.Generator().manual_seed(5)
    taus = torch.randn(8, 1000, generator=g) * torch.logspace(-6, 6, 8)[:, None]
    sequential = taus[0].clone()
    for row in taus[1:]:
        sequential += row
    assert torch.equal(task_sum(taus), sequential)
    pre = {"w": torch.randn(50_000, generator=g)}
    save_file(pre, tmp_path / "pre.safetensors")
    fts = {}
    for i in range(8):
        fts[f"t{i}"] = tmp_path / f"t{i}.safetensors"
        save_file({"w": pre["w"] + torch.randn(50_000, generator=g) * 10.0 ** (i - 4)}, fts[f"t{i}"])
    quantize(tmp_path / "pre.safetensors", fts, tmp_path / "pack", QuantizeOptions(bits=1), progress=False)
    p, vectors = load_task_vectors(tmp_path / "pre.safetensors", packs=[tmp_path / "pack"])
    coded = merge_state_dict("task_arithmetic", p, vectors)
    dense = merge_state_dict("task_arithmetic", p, _dense(vectors))
    assert torch.equal(coded["w"], dense["w"])


@pytest.mark.parametrize("pack", list(PACKS))
@pytest.mark.parametrize(("density", "tie_rule"), [(0.1, "exact"), (0.2, "keep_ties"), (0.97, "exact"), (0.5, "exact")])
def test_global_pre_pass_from_code_histograms_is_the_dense_one(inputs: dict, pack: str, density: float, tie_rule: str, monkeypatch) -> None:
    """Scope=global from a pack: cut-offs from code histograms, the tie-break over the tensors
    holding tied entries only, the vote and the entries kept from the codes: every number the
    dense pre-pass gives (at 0.97 the 2-bit packs cut at 0, where ties go in index order)."""
    from tvq.merge import ties_global
    from tvq.merge.methods import ties as ties_module
    from tvq.merge.methods.ties import TiesStats
    from tvq.merge.source import TaskSource

    monkeypatch.setattr("tvq.merge.blocks.BLOCK_ELEMENTS", 1 << 14)  # "big" and "wide" by blocks
    pre, vectors = load_task_vectors(inputs["pre"], packs=[inputs["packs"][pack]])
    counted = []
    original = ties_global.model_counts
    monkeypatch.setattr("tvq.merge.methods.ties.model_counts", lambda *a, **k: counted.append(1) or original(*a, **k))
    cuts: list[object] = []
    original_cuts = ties_module.coded_tie_cuts
    monkeypatch.setattr(ties_module, "coded_tie_cuts", lambda *a, **k: cuts.append(found := original_cuts(*a, **k)) or found)
    coded = TiesStats.compute(TaskSource(pre, vectors), density, tie_rule=tie_rule)
    from_codes = [c for c in cuts if c]
    dense = TiesStats.compute(TaskSource(pre, _dense(vectors)), density, tie_rule=tie_rule)
    assert counted == [1, 1]
    if tie_rule == "exact":
        assert from_codes  # the tie cuts came from one pass over the codes of the tensor holding them
    assert torch.equal(coded.thresholds, dense.thresholds)
    assert (coded.hash_cut, coded.cut_key, coded.cut_index) == (dense.hash_cut, dense.cut_key, dense.cut_index)
    assert coded.majority == dense.majority
    assert coded.kept == dense.kept
    if density == 0.97 and pack == "tvq2":
        assert float(coded.thresholds.min()) == 0.0  # the zeros' index-order path was taken


@pytest.mark.parametrize("tasks", [1, 3, 9])
def test_coded_sum_compiled_is_the_torch_loop_bit_for_bit(tasks: int, monkeypatch) -> None:
    """Task arithmetic's gather-and-add from codes: the compiled loop (numba) gives the torch
    loop's bytes, for uint8, int16 and int32 codes, tables of different sizes, ragged lengths."""
    from tvq.merge import coded as coded_module

    g = torch.Generator().manual_seed(tasks)
    n = coded_module._CHUNK + 4097  # a chunk and a ragged run beyond it
    sizes = [4, 300, 16, 2, 1024, 8, 1, 64, 256][:tasks]
    codes = []
    for t, v in enumerate(sizes):
        dtype = {1: torch.int16, 4: torch.int32}.get(t, torch.uint8)  # the wide tables' codes
        table = torch.randn(v, generator=g) * 10.0 ** torch.randint(-3, 3, (v,), generator=g)
        codes.append(CodedTensor(table, torch.randint(0, v, (n,), generator=g).to(dtype)))
    assert coded_module._sum_kernel(codes) is not None
    compiled = coded_module.coded_sum(codes)
    monkeypatch.setenv("TVQ_SUM_KERNEL", "torch")
    assert coded_module._sum_kernel(codes) is None
    reference = coded_module.coded_sum(codes)
    assert torch.equal(compiled.view(torch.int32), reference.view(torch.int32))
    dense = torch.stack([c.table[c.index.long()] for c in codes])
    expected = dense[0].clone()
    for row in dense[1:]:
        expected += row  # the dense sum in task order
    assert torch.equal(compiled.view(torch.int32), expected.view(torch.int32))
