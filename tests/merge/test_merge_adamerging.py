"""AdaMerging learns real coefficients on a real (tiny) module through functional_call."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tvq.merge import adamerging, merge_state_dict
from tvq.vector import TaskVector


def setup(seed: int = 0):
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    pre = {k: v.detach().clone() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    vectors = {t: TaskVector.from_state_dict({k: torch.randn(v.shape, generator=g) for k, v in pre.items()}, name=t) for t in ("a", "b")}
    data = {t: torch.randn(16, 4, generator=g) for t in vectors}
    return module, pre, vectors, data


def entropy_of(pre, vectors, coeffs, data) -> float:
    """Σ_t mean entropy of the model θ_pre + Σ c τ, built by hand (no tvq code)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model.load_state_dict({k: pre[k] + sum(coeffs[k][i] * vectors[t][k] for i, t in enumerate(vectors)) for k in pre})
    total = 0.0
    with torch.no_grad():
        for x in data.values():
            p = model(x).softmax(-1)
            total += float(-(p * p.log()).sum(-1).mean())
    return total


def test_first_adam_step_moves_each_coefficient_by_lr_against_the_gradient():
    module, pre, vectors, data = setup()
    before = copy.deepcopy(module.state_dict())
    result = adamerging(module, vectors, lambda task, step: data[task], steps=1, lr=1e-3)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # the module is not modified
    coeffs = {k: torch.full((2,), 0.3, dtype=torch.float64) for k in pre}
    checked = 0
    for key in pre:
        for i in range(2):
            up = {k: v.clone() for k, v in coeffs.items()}
            down = {k: v.clone() for k, v in coeffs.items()}
            up[key][i] += 1e-3
            down[key][i] -= 1e-3
            grad = (entropy_of(pre, vectors, up, data) - entropy_of(pre, vectors, down, data)) / 2e-3
            if abs(grad) > 1e-2:
                expected = 0.3 - 1e-3 * (1 if grad > 0 else -1)  # Adam's first step is lr·sign(g)
                assert abs(float(result.coefficients[key][i]) - expected) < 2e-5, (key, i, grad)
                checked += 1
    assert checked >= 4
    assert abs(result.losses[0] - entropy_of(pre, vectors, coeffs, data)) < 1e-4


def test_training_lowers_entropy_and_the_saved_coefficients_merge(tmp_path):
    module, pre, vectors, data = setup(3)
    result = adamerging(module, vectors, lambda task, step: data[task], steps=60, lr=2e-2)
    assert result.losses[-1] < result.losses[0] - 0.05
    assert all(bool(((c >= 0) & (c <= 1)).all()) for c in result.coefficients.values())
    path = tmp_path / "coefficients.json"
    result.save(path)
    out = merge_state_dict("adamerging", pre, vectors, {"coefficients": str(path)})
    for k in pre:
        expected = pre[k] + result.coefficients[k][0] * vectors["a"][k] + result.coefficients[k][1] * vectors["b"][k]
        torch.testing.assert_close(out[k], expected)
    assert abs(entropy_of(pre, vectors, result.coefficients, data) - result.losses[-1]) < 0.1


def test_task_wise_and_per_task_steps():
    module, _pre, vectors, data = setup(5)
    result = adamerging(module, vectors, lambda task, step: data[task], steps=3, granularity="task", step_per_task=True)
    first = next(iter(result.coefficients.values()))
    assert all(torch.equal(c, first) for c in result.coefficients.values())
    assert not torch.equal(first, torch.full((2,), 0.3))
