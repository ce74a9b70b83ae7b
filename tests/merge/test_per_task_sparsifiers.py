"""Per-task weights and densities for DARE and Breadcrumbs (mergekit's per-model ``parameters``):
checked against mergekit's formulas (generalized task arithmetic: each model sparsified with its own
density/gamma, weighted, summed or sign-elected, ÷ Σ w with ``normalize``), DARE's masks still
seeded per (seed, task, tensor), one shared value the old path bit for bit, and mergekit YAMLs
with differing per-model values accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tvq.errors import ConfigError
from tvq.merge import merge_state_dict
from tvq.merge.mergekit_config import read_mergekit
from tvq.merge.ops import dare_, tensor_seed
from tvq.vector import TaskVector

TASKS = ("a", "b", "c")
SHAPES = {"w": (6, 10), "m": (40,)}


def vectors() -> dict[str, TaskVector]:
    g = torch.Generator().manual_seed(7)
    return {t: TaskVector.from_state_dict({k: torch.randn(s, generator=g) for k, s in SHAPES.items()}) for t in TASKS}


def merged(method: str, **options) -> dict[str, torch.Tensor]:
    pre = {k: torch.zeros(s) for k, s in SHAPES.items()}
    return merge_state_dict(method, pre, vectors(), options)


def outliers_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers (no ties among random floats): drop the top int(γ·n) by |τ|,
    keep the next int(d·n)."""
    n = tau.numel()
    order = tau.abs().reshape(-1).argsort(descending=True)
    top, keep = int(gamma * n), int(density * n)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[top : top + keep]] = True
    return mask.reshape(tau.shape)


def gta(deltas: list[torch.Tensor], weights: list[float], consensus: bool, normalize: bool) -> torch.Tensor:
    """mergekit's generalized task arithmetic on already-sparsified deltas."""
    stacked = torch.stack(deltas).double()
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if consensus:
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        mask = weighted.sign() == majority
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    return (mixed / divisor if normalize else mixed).float()


DENSITY = {"a": 0.2, "b": 0.5, "c": 0.3}
GAMMA = {"a": 0.0, "b": 0.1, "c": 0.05}
WEIGHT = {"a": 1.0, "b": 0.5, "c": -0.3}


@pytest.mark.parametrize(("method", "consensus", "aggregate"), [("breadcrumbs", False, None), ("breadcrumbs_ties", True, "sum"),
                                                                 ("breadcrumbs_ties", True, "mean")])  # fmt: skip
def test_breadcrumbs_per_task_values_are_mergekits(method, consensus, aggregate):
    opts = {"density": DENSITY, "gamma": GAMMA, "weight": WEIGHT, "scope": "tensor", "lambda": 0.7}
    if aggregate is not None:
        opts["aggregate"] = aggregate
    out = merged(method, **opts)
    vs = vectors()
    for key in SHAPES:
        deltas = [vs[t][key] * outliers_mask(vs[t][key], DENSITY[t], GAMMA[t]) for t in TASKS]
        expected = gta(deltas, [WEIGHT[t] for t in TASKS], consensus, aggregate == "mean") * 0.7
        assert torch.allclose(out[key], expected, atol=1e-6), key


def test_dare_per_task_drop_rates_keep_the_seeded_masks():
    rates, seed = {"a": 0.3, "b": 0.7, "c": 0.5}, 11
    vs = vectors()
    dropped = {t: {k: dare_(vs[t][k].clone(), rates[t], True, tensor_seed(seed, t, k)) for k in SHAPES} for t in TASKS}
    out = merged("dare", drop_rate=rates, weight=WEIGHT, seed=seed, **{"lambda": 0.4})
    for key in SHAPES:
        expected = sum(WEIGHT[t] * dropped[t][key] for t in TASKS) * 0.4
        assert torch.allclose(out[key], expected, atol=1e-6), key
    # a task's mask depends on its own rate, seed, name and tensor only: alone at its rate, the same entries
    for t in TASKS:
        alone = merge_state_dict("dare", {k: torch.zeros(s) for k, s in SHAPES.items()}, {t: vs[t]},
                                 {"drop_rate": rates[t], "seed": seed, "lambda": 1.0})  # fmt: skip
        assert all(torch.equal(alone[k], dropped[t][k]) for k in SHAPES)


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_dare_ties_with_weights_elects_like_mergekit(aggregate):
    rates, seed = {"a": 0.3, "b": 0.6, "c": 0.5}, 3
    vs = vectors()
    out = merged("dare_ties", drop_rate=rates, weight=WEIGHT, seed=seed, density=1.0, scope="tensor", aggregate=aggregate,
                 rescale_mode="l1", **{"lambda": 1.0})  # fmt: skip
    for key in SHAPES:
        deltas = []
        for t in TASKS:
            tau = vs[t][key].clone()
            before = tau.abs().sum(dtype=torch.float64)
            dare_(tau, rates[t], False, tensor_seed(seed, t, key))
            deltas.append(tau * float(before / tau.abs().sum(dtype=torch.float64)))  # mergekit's L1 rescaling
        expected = gta(deltas, [WEIGHT[t] for t in TASKS], True, aggregate == "mean")
        assert torch.allclose(out[key], expected, atol=1e-5), key


@pytest.mark.parametrize(
    ("method", "one", "per_task"),
    [
        ("breadcrumbs", {"density": 0.3, "gamma": 0.05}, {"density": dict.fromkeys(TASKS, 0.3), "gamma": dict.fromkeys(TASKS, 0.05), "weight": 1.0}),
        ("breadcrumbs_ties", {"density": 0.3}, {"density": dict.fromkeys(TASKS, 0.3), "weight": dict.fromkeys(TASKS, 1.0)}),
        ("dare", {"drop_rate": 0.4}, {"drop_rate": dict.fromkeys(TASKS, 0.4), "weight": dict.fromkeys(TASKS, 1.0)}),
        ("dare_ties", {"drop_rate": 0.4, "scope": "tensor"}, {"drop_rate": dict.fromkeys(TASKS, 0.4), "scope": "tensor", "weight": 1.0}),
    ],
)
def test_one_value_for_every_task_is_the_unweighted_path_bit_for_bit(method, one, per_task):
    a, b = merged(method, **one), merged(method, **per_task)
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)


def test_weight_does_not_apply_to_dare_average():
    with pytest.raises(ConfigError, match="weight"):
        merged("dare", base="average", weight=WEIGHT)


def _config(method: str, params: dict[str, dict], normalize: bool | None = None) -> dict:
    cfg: dict = {"merge_method": method, "base_model": "base", "models": [{"model": f"ft/{t}", "parameters": params[t]} for t in TASKS]}
    if normalize is not None:
        cfg["parameters"] = {"normalize": normalize}
    return cfg


def test_mergekit_configs_with_differing_per_model_values():
    params = {t: {"weight": WEIGHT[t], "density": DENSITY[t], "gamma": GAMMA[t]} for t in TASKS}
    plan = read_mergekit(_config("breadcrumbs_ties", params, normalize=True), Path("m.yml"))
    assert plan.method == "breadcrumbs_ties"
    assert plan.options["density"] == DENSITY and plan.options["gamma"] == GAMMA and plan.options["weight"] == WEIGHT
    assert plan.options["aggregate"] == "mean" and plan.options["lambda"] == 1.0

    dare = {t: {"weight": WEIGHT[t], "density": DENSITY[t]} for t in TASKS}
    plan = read_mergekit(_config("dare_linear", dare, normalize=True), Path("m.yml"))
    total = sum(WEIGHT.values())
    assert plan.options["drop_rate"] == {t: 1.0 - DENSITY[t] for t in TASKS}
    assert plan.options["weight"] == pytest.approx({t: WEIGHT[t] / total for t in TASKS})  # mergekit's ÷ Σ w, folded in
    plan = read_mergekit(_config("dare_ties", dare), Path("m.yml"))
    assert plan.options["weight"] == WEIGHT and plan.options["aggregate"] == "sum" and plan.options["density"] == 1.0

    uniform = {t: {"weight": 0.5, "density": 0.4} for t in TASKS}  # one value: folded into λ, no per-task options
    plan = read_mergekit(_config("dare_linear", uniform), Path("m.yml"))
    assert "weight" not in plan.options and plan.options["lambda"] == 0.5 and plan.options["drop_rate"] == pytest.approx(0.6)
