"""Merging straight from packs equals merging the dequantized vectors; merges stream."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tvq.errors import CheckpointError
from tvq.merge import (
    AdaMergingResult,
    load_task_vectors,
    merge,
    merge_state_dict,
    open_emr,
)
from tvq.merge.ops import global_kth_largest, magnitude_threshold
from tvq.pack.reader import open_pack
from tvq.vector import TaskVector

from merge_helpers import make_ckpts, make_pack, small_model

METHODS = [
    ("average", {}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("ties", {"scope": "tensor", "density": 0.5}),
    ("dare", {"drop_rate": 0.5}),
    ("dare_ties", {"drop_rate": 0.3}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
    ("magmax", {}),
    ("lines", {}),
    ("consensus", {}),
    ("consensus", {"base": "ties"}),
    ("adamerging", None),
]


def dequantized(pack_path, pre) -> dict[str, TaskVector]:
    """The pack's task vectors, fully decoded into memory first (the non-streaming reference)."""
    pack = open_pack(pack_path, pre)
    return {t: TaskVector.from_state_dict(pack.task_vector(t).materialize(), name=t) for t in pack.tasks}


@pytest.fixture
def ckpts(tmp_path):
    return make_ckpts(tmp_path)


@pytest.fixture
def packs(ckpts):
    d = ckpts["dir"]
    return {
        "tvq4": make_pack(ckpts, d / "tvq4", bits=4),
        "rtvq": make_pack(ckpts, d / "rtvq", bits=2, residual=True, base_bits=3, error_correction=True),
        "fq8": make_pack(ckpts, d / "fq8", bits=8, target="finetuned"),
    }


@pytest.mark.parametrize(("method", "options"), METHODS, ids=lambda x: x if isinstance(x, str) else None)
def test_merge_from_pack_equals_merge_of_dequantized_vectors(ckpts, packs, method, options, tmp_path):
    for kind, pack_path in packs.items():
        pre, from_pack = load_task_vectors(ckpts["pre_path"], packs=[pack_path])
        if options is None:  # adamerging: coefficients learned elsewhere, one per tensor and task
            coeffs = {k: torch.linspace(0.1, 0.9, 3) for k in from_pack["t0"]}
            options = {"coefficients": str(tmp_path / "c.json")}
            AdaMergingResult(list(from_pack), coeffs).save(options["coefficients"])
        streamed = merge_state_dict(method, pre, from_pack, options)
        reference = merge_state_dict(method, ckpts["pre"], dequantized(pack_path, ckpts["pre_path"]), options)
        assert streamed.keys() == reference.keys() == ckpts["pre"].keys()
        for key in streamed:
            assert torch.equal(streamed[key], reference[key]), (kind, key)


def test_packs_and_fp32_checkpoints_mix(ckpts, packs, tmp_path):
    ft = {"extra": ckpts["ft_paths"]["t1"]}
    pre, vectors = load_task_vectors(ckpts["pre_path"], packs=[packs["tvq4"]], finetuned=ft)
    assert list(vectors) == ["t0", "t1", "t2", "extra"]
    out = merge("ties", pre, vectors, tmp_path / "m.safetensors", {"scope": "tensor"})
    written = load_file(out.out)
    fp32 = {k: ckpts["fts"]["t1"][k].float() - v.float() for k, v in ckpts["pre"].items() if v.is_floating_point()}
    memory = {**dequantized(packs["tvq4"], ckpts["pre_path"]), "extra": TaskVector.from_state_dict(fp32)}
    expected = merge_state_dict("ties", ckpts["pre"], memory, {"scope": "tensor"})
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in written)
    with pytest.raises(Exception, match="appears twice"):
        load_task_vectors(ckpts["pre_path"], packs=[packs["tvq4"]], finetuned={"t0": ckpts["ft_paths"]["t0"]})


def test_emr_unified_pack_round_trip(ckpts, packs, tmp_path):
    pre, vectors = load_task_vectors(ckpts["pre_path"], packs=[packs["rtvq"]])
    report = merge("emr", pre, vectors, tmp_path / "emr.safetensors")
    pack = open_emr(report.out)
    assert pack.tasks == ["t0", "t1", "t2"] and pack.rescalers.shape == (3,)
    raw = load_file(report.out)
    n = ckpts["pre"]["encoder.layer.0.attn.weight"].numel()
    assert raw["masks.encoder.layer.0.attn.weight"].shape == (3, (n + 7) // 8)  # 1 bit per entry per task
    for task in pack.tasks:
        direct = merge_state_dict("emr", pre, vectors, task=task)
        via_pack = merge_state_dict("task_arithmetic", pre, {task: pack.task_vector(task)}, {"lambda": 1.0})
        for key in direct:
            torch.testing.assert_close(direct[key], via_pack[key], rtol=0, atol=1e-6)


def test_each_tensor_is_read_once_per_pass():
    pre = small_model()
    reads: Counter = Counter()

    def counting(task: str) -> TaskVector:
        keys = [k for k, v in pre.items() if v.is_floating_point()]

        def get(key: str) -> torch.Tensor:
            reads[task, key] += 1
            return torch.full(pre[key].shape, 0.01)

        return TaskVector(keys, get, name=task)

    vectors = {t: counting(t) for t in ("a", "b")}
    merge_state_dict("task_arithmetic", pre, vectors)
    assert set(reads.values()) == {1}
    reads.clear()
    merge_state_dict("ties", pre, vectors, {"tie_rule": "keep_ties"})  # global top-k: 2 histogram passes + majority sign + merge
    assert set(reads.values()) == {4}
    reads.clear()
    merge_state_dict("ties", pre, vectors)  # every entry ties at the cut-off: + 2 tie-break passes (exact rule)
    assert set(reads.values()) == {6}


def test_mismatched_shapes_name_the_tensor(ckpts, tmp_path):
    pre = dict(ckpts["pre"])
    pre["head.weight"] = torch.zeros(5, 8)
    from safetensors.torch import save_file

    save_file(pre, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="head.weight"):
        load_task_vectors(tmp_path / "other.safetensors", finetuned=ckpts["ft_paths"])
    bad = {"a": TaskVector.from_state_dict({k: torch.zeros(3) for k, v in ckpts["pre"].items() if v.is_floating_point()})}
    with pytest.raises(CheckpointError, match="shape .* differs"):
        merge_state_dict("task_arithmetic", ckpts["pre"], bad)
    missing = {"a": TaskVector.from_state_dict({"head.weight": torch.zeros(4, 8)})}
    with pytest.raises(CheckpointError, match="task 'a': tensor '.*' is missing"):
        merge_state_dict("task_arithmetic", ckpts["pre"], missing)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    density=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
    quantized=st.booleans(),
)
def test_global_threshold_equals_a_full_kthvalue(sizes, density, seed, quantized):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, n, generator=g) * 10 ** torch.randint(-3, 3, (1,), generator=g).item() for n in sizes]
    if quantized:  # many exact ties and zeros, as in dequantized packs
        batches = [torch.round(b * 2) / 2 for b in batches]
    flat = torch.cat([b for b in batches], dim=1).abs()
    n = flat.shape[1]
    k = max(1, int(density * n))
    got = global_kth_largest(lambda: iter(batches), k, 2)
    expected = flat.sort(dim=1, descending=True).values[:, k - 1]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("quantized", [False, True])
def test_per_tensor_threshold_on_large_tensors(quantized):
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(4))
    if quantized:
        x = torch.round(x * 8) / 8
    for density in (0.001, 0.2, 0.77):
        k = max(1, int(density * x.numel()))
        assert float(magnitude_threshold(x, density)) == float(x.abs().sort(descending=True).values[k - 1])
    assert float(magnitude_threshold(x, 1.0)) == 0.0 and float(magnitude_threshold(x, 0.0)) == float("inf")
