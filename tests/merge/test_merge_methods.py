"""Each method pinned to numbers worked out by hand from its paper / reference code."""

from __future__ import annotations

import pytest
import torch

from tvq.errors import ConfigError
from tvq.merge import merge_state_dict
from tvq.merge.methods.lines import depth_scales

from merge_helpers import tv


def merged(method: str, vectors: dict, pre: dict | None = None, task: str | None = None, **options) -> dict[str, torch.Tensor]:
    first = next(iter(vectors.values()))
    pre = pre or {k: torch.zeros(first[k].shape) for k in first}
    return merge_state_dict(method, pre, vectors, options, task=task)


def close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_average_and_task_arithmetic():
    vectors = {"a": tv(w=[1, 2, -3]), "b": tv(w=[3, 0, 1])}
    pre = {"w": torch.full((3,), 10.0)}
    close(merged("average", vectors, pre)["w"], [12, 11, 9])  # mean τ = [2, 1, -1]
    close(merged("task_arithmetic", vectors, pre)["w"], [11.2, 10.6, 9.4])  # λ = 0.3 by default, Σ τ = [4, 2, -2]
    close(merged("ta", vectors, pre, **{"lambda": 1.0})["w"], [14, 12, 8])


TIES_VECTORS = {
    "a": tv(w=[4, -1, 0.5, -3, 2]),
    "b": tv(w=[-2, 3, 1, -0.5, 0.2]),
    "c": tv(w=[1, -2, -4, 0.1, 3]),
}


def test_ties_trim_elect_disjoint_mean():
    # density 0.6 keeps int(0.6·5) = 3 per task: a→[4,0,0,-3,2], b→[-2,3,1,0,0], c→[0,-2,-4,0,3]
    # sums [2,1,-3,-3,5] elect [+,+,-,-,+]; agreeing entries: 4 | 3 | -4 | -3 | 2,3
    out = merged("ties", TIES_VECTORS, density=0.6, scope="tensor", **{"lambda": 1.0})
    close(out["w"], [4, 3, -4, -3, 2.5])
    close(merged("ties_merging", TIES_VECTORS, density=0.6, scope="tensor")["w"], [1.2, 0.9, -1.2, -0.9, 0.75])  # λ = 0.3
    close(merged("ties", TIES_VECTORS, density=0.6, scope="tensor", aggregate="sum", **{"lambda": 1.0})["w"], [4, 3, -4, -3, 5])


def test_ties_zero_sum_takes_the_majority_sign():
    # sums [0, -4, -3]: the majority sign is -, so entry 0 keeps the -2 of task b
    vectors = {"a": tv(w=[2, -1, -1]), "b": tv(w=[-2, -3, -2])}
    close(merged("ties", vectors, density=1.0, scope="tensor", **{"lambda": 1.0})["w"], [-2, -2, -1.5])


def test_ties_global_topk_differs_from_per_tensor():
    vectors = {"t1": tv(a=[5, -1], b=[0.5, 3, -4]), "t2": tv(a=[1, -2], b=[-6, 0.1, 2.5])}
    # global, 5 entries, keep 2 per task: t1 keeps 5, -4; t2 keeps -6, 2.5.
    # a: sums [5, 0]; b: [-6, 0, -1.5]; majority over all signs (+,0,-,0,-) is -, which only
    # affects empty entries. Merged: a [5, 0], b [-6, 0, -4] (t2's 2.5 disagrees with -).
    out = merged("ties", vectors, density=0.4, **{"lambda": 1.0})
    close(out["a"], [5, 0])
    close(out["b"], [-6, 0, -4])
    # per tensor: a keeps max(1, int(0.8)) = 1 per task -> t1 5, t2 -2 -> [5, -2]
    out = merged("ties", vectors, density=0.4, scope="tensor", **{"lambda": 1.0})
    close(out["a"], [5, -2])
    close(out["b"], [-6, 0, -4])


def test_breadcrumbs_per_row_and_per_tensor():
    w = [[1, -8, 3, 0.5, -2, 6, 0.2, 4, -5, 7], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]]
    vectors = {"a": tv(w=w, s=3.0)}
    # per row: drop the top int(0.1·10) = 1, keep the next int(0.3·10) = 3
    out = merged("breadcrumbs", vectors, density=0.3, gamma=0.1, **{"lambda": 1.0})
    close(out["w"], [[0, 0, 0, 0, 0, 6, 0, 0, -5, 7], [0, 0, 0, 0, 0, 0, 0.7, 0.8, 0.9, 0]])
    close(out["s"], 3.0)  # 0-d tensors are kept whole, as in the reference
    # per tensor (mergekit): drop the top 2 (-8, 7), keep the next 6 (6, -5, 4, 3, -2, 1)
    out = merged("breadcrumbs", vectors, density=0.3, gamma=0.1, scope="tensor", **{"lambda": 1.0})
    close(out["w"], [[1, 0, 3, 0, -2, 6, 0, 4, -5, 0], [0] * 10])


def test_magmax_takes_the_largest_magnitude_later_task_on_ties():
    vectors = {"a": tv(w=[1, -5, 2, 3]), "b": tv(w=[-2, 4, 2, -3])}
    close(merged("magmax", vectors)["w"], [-1, -2.5, 1, -1.5])  # [-2, -5, 2, -3] · 0.5


def test_lines_scales_by_depth_with_the_real_number_of_blocks():
    keys = ["embed.weight", "enc.layer.0.w", "enc.layer.1.w", "enc.layer.2.w", "head.w"]
    vectors = {"a": tv(**{k: [1.0] for k in keys}), "b": tv(**{k: [2.0] for k in keys})}
    out = merged("lines", vectors)  # α = 1/T = 0.5, β = 0.5, L = 3 -> 0.5, 0.75, 1.0; Σ τ = 3
    assert [float(out[k]) for k in keys] == pytest.approx([1.5, 1.5, 2.25, 3.0, 1.5])
    out = merged("lines", vectors, alpha=0.1, beta=1.0, num_blocks=5)  # 0.1 + l/4
    assert [float(out[k]) for k in keys] == pytest.approx([0.3, 0.3, 1.05, 1.8, 0.3])


def test_lines_finds_each_block_stack():
    keys = [
        "model.visual.conv1.weight",
        *(f"model.visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(12)),
        "model.visual.proj",
        *(f"decoder.block.{i}.w" for i in range(4)),
    ]
    s = depth_scales(keys, alpha=0.125, beta=0.5)
    assert s["model.visual.conv1.weight"] == s["model.visual.proj"] == 0.125
    assert s["model.visual.transformer.resblocks.11.attn.in_proj_weight"] == 0.625  # L = 12, not TVQ's hard-coded 24
    assert s["model.visual.transformer.resblocks.1.attn.in_proj_weight"] == pytest.approx(0.125 + 0.5 / 11)
    assert s["decoder.block.3.w"] == 0.625 and s["decoder.block.1.w"] == pytest.approx(0.125 + 0.5 / 3)


CONSENSUS_VECTORS = {
    "t1": tv(w=[1, 0.1, -2, 0.5]),
    "t2": tv(w=[1, -3, -2, 0.4]),
    "t3": tv(w=[-0.2, 0.1, 1, 0.5]),
}


def test_consensus_tall_masks():
    # τ_MTL = [1.8, -2.8, -3, 1.4]; with λ_t = 0.5 the masks |τ_t| >= 0.5|τ_MTL - τ_t| are
    # t1 [1,0,1,1], t2 [1,1,1,0], t3 [0,0,0,1] -> votes [2,1,2,2]
    close(merged("consensus", CONSENSUS_VECTORS, mask_lambda=0.5, **{"lambda": 1.0})["w"], [1.8, 0, -3, 1.4])
    close(merged("tall_masks", CONSENSUS_VECTORS, mask_lambda=0.5, k=3)["w"], [0, 0, 0, 0])
    # a smaller λ for t3 turns its mask to [1,0,1,1]: votes [3,1,3,2]
    per_task = {"t1": 0.5, "t2": 0.5, "t3": 0.05}
    close(merged("consensus", CONSENSUS_VECTORS, mask_lambda=per_task, k=3, **{"lambda": 0.5})["w"], [0.9, 0, -1.5, 0])
    with pytest.raises(ConfigError, match="every task"):
        merged("consensus", CONSENSUS_VECTORS, mask_lambda={"t1": 0.5})


def test_consensus_with_ties_base():
    # TIES (global, density 1 -> no trim) disjoint *sum*: sums [1.8,-2.8,-3,1.4] -> [+,-,-,+]
    # agreeing sums: [2, -3, -4, 1.4]; masks vs that τ_MTL with λ = 0.5:
    # t1 [1,0,1,1] t2 [1,1,1,0] t3 [0,0,0,1] -> k = 2 keeps entries 0, 2, 3
    out = merged("consensus", CONSENSUS_VECTORS, base="ties", density=1.0, mask_lambda=0.5, **{"lambda": 1.0})
    close(out["w"], [2, 0, -4, 1.4])


EMR_VECTORS = {"t1": tv(a=[2, -1, 0, 3, 1], b=[4.0]), "t2": tv(a=[-1, -2, 1, 1, -1], b=[4.0])}


def test_emr_task_models():
    # a: mean [.5,-1.5,.5,2,0] -> sign [+,-,+,+,-] (0 -> -); masks t1 [1,1,0,1,0], t2 [0,1,1,1,1]
    # unified a = [2,-2,1,3,-1], b = [4]; rescalers = Σ mean|τ_t| / Σ mean|m_t τ_uni|:
    # t1 (7/5 + 4) / (7/5 + 4) = 1, t2 (6/5 + 4) / (7/5 + 4) = 26/27
    out = merged("emr", EMR_VECTORS, task="t1")
    close(out["a"], [2, -2, 0, 3, 0])
    close(out["b"], [4])
    out = merged("emr_merging", EMR_VECTORS, task="t2")
    close(out["a"], [0, -2 * 26 / 27, 26 / 27, 3 * 26 / 27, -26 / 27])
    close(out["b"], [4 * 26 / 27])
    with pytest.raises(ConfigError, match="task"):
        merged("emr", EMR_VECTORS)


def test_adamerging_applies_clamped_coefficients(tmp_path):
    from tvq.merge import AdaMergingResult

    vectors = {"a": tv(w=[1, 2], b=[1.0]), "b": tv(w=[10, 20], b=[1.0])}
    path = tmp_path / "coef.json"
    # stored in another task order; values outside [0, 1] are clamped like in training
    AdaMergingResult(["b", "a"], {"w": torch.tensor([0.5, 2.0]), "b": torch.tensor([-1.0, 0.25])}).save(path)
    out = merged("adamerging", vectors, coefficients=str(path))
    close(out["w"], [1 * 1.0 + 10 * 0.5, 2 * 1.0 + 20 * 0.5])
    close(out["b"], [0.25])
    with pytest.raises(ConfigError, match="'coefficients' is required"):
        merged("adamerging", vectors)


def test_dare_drops_and_rescales_each_entry():
    g = torch.Generator().manual_seed(0)
    vectors = {"a": tv(w=torch.randn(200, 100, generator=g).tolist())}
    tau = vectors["a"]["w"]
    out = merged("dare", vectors, drop_rate=0.75, **{"lambda": 1.0})["w"]
    kept = out != 0
    assert 0.22 < kept.float().mean() < 0.28  # 1 - p survive
    torch.testing.assert_close(out[kept], tau[kept] * 4)  # survivors scaled by 1/(1-p)
    same = merged("dare", vectors, drop_rate=0.75, **{"lambda": 1.0})["w"]
    assert torch.equal(out, same)
    other = merged("dare", vectors, drop_rate=0.75, seed=1, **{"lambda": 1.0})["w"]
    assert not torch.equal(out, other)
    raw = merged("dare", vectors, drop_rate=0.75, rescale=False, **{"lambda": 1.0})["w"]
    torch.testing.assert_close(raw * 4, out)
    close(merged("dare", vectors, drop_rate=0.0)["w"], (tau * 0.3).tolist())  # p = 0 is task arithmetic


def test_dare_masks_depend_on_seed_task_and_tensor_only():
    g = torch.Generator().manual_seed(1)
    data = {k: torch.randn(50, generator=g).tolist() for k in ("x", "y")}
    both = merged("dare", {"a": tv(**data), "b": tv(**data)}, **{"lambda": 1.0})
    alone = merged("dare", {"a": tv(y=data["y"])}, **{"lambda": 1.0})  # other task and tensor absent
    flipped = merged("dare", {"b": tv(**data), "a": tv(**data)}, **{"lambda": 1.0})
    assert torch.equal(both["y"], flipped["y"])
    b_alone = merged("dare", {"b": tv(y=data["y"])}, **{"lambda": 1.0})
    torch.testing.assert_close(both["y"], alone["y"] + b_alone["y"])


def test_dare_ties_is_ties_of_the_dropped_vectors():
    g = torch.Generator().manual_seed(2)
    raw = {t: {"x": torch.randn(6, 5, generator=g), "y": torch.randn(7, generator=g)} for t in ("a", "b", "c")}
    vectors = {t: tv(**{k: v.tolist() for k, v in d.items()}) for t, d in raw.items()}
    pre = {"x": torch.zeros(6, 5), "y": torch.zeros(7)}
    dropped = {t: merge_state_dict("dare", pre, {t: vectors[t]}, {"drop_rate": 0.5, "lambda": 1.0}) for t in vectors}
    dropped = {t: tv(**{k: v.tolist() for k, v in d.items()}) for t, d in dropped.items()}
    for scope in ("global", "tensor"):
        expected = merge_state_dict("ties", pre, dropped, {"density": 0.5, "scope": scope})
        got = merge_state_dict("dare_ties", pre, vectors, {"drop_rate": 0.5, "density": 0.5, "scope": scope})
        for k in pre:
            torch.testing.assert_close(got[k], expected[k])


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("nope", {}, "unknown merge method 'nope' (valid methods: adamerging"),
        ("ties", {"densty": 0.2}, "unknown option 'densty' (valid options: density, lambda, scope, aggregate, tie_rule, weight)"),
        ("ties", {"density": 2}, "invalid value for 'density'"),
        ("ties", {"scope": "layer"}, "invalid value for 'scope'"),
        ("average", {"lambda": 1}, "unknown option 'lambda' (valid options: none)"),
        ("dare", {"density": 0.5}, "only applies with base=ties"),
        ("task_arithmetic", {"lambda": "big"}, "invalid value for 'lambda'"),
    ],
)
def test_bad_options_are_one_line_config_errors(method, options, message):
    with pytest.raises(ConfigError) as err:
        merged(method, {"a": tv(w=[1.0])}, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_output_dtype_and_untouched_buffers():
    pre = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "ids": torch.arange(3)}
    vectors = {"a": tv(w=[0.5, 0.25])}
    out = merge_state_dict("task_arithmetic", pre, vectors, {"lambda": 1.0})
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["ids"], pre["ids"])
    out = merge_state_dict("task_arithmetic", pre, vectors, {"lambda": 1.0}, dtype="float32")
    close(out["w"], [1.5, 2.25])
