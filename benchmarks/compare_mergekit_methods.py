"""tvq's model_stock, della, della_linear and breadcrumbs_ties vs mergekit's, tensor by tensor.

Not a test (mergekit is not a dependency). mergekit's merge functions are called directly on
the same fp32 tensors (``get(name).merge_group(TensorGroup.from_tensors([θ_pre, θ_1, …]))``)
and compared with ``tvq.merge.merge_state_dict`` on the task vectors θ_t − θ_pre.
Install mergekit beside tvq without touching the environment's packages:

    pip install --no-deps --target /tmp/mk-pkgs mergekit
    PYTHONPATH=/tmp/mk-pkgs python benchmarks/compare_mergekit_methods.py

DELLA draws a random mask. To compare everything else, mergekit's ``torch.bernoulli`` is
replaced for the call by a function that (1) records the keep probabilities mergekit asks
for, compared with ``tvq.merge.methods.della.keep_probability``, and (2) returns tvq's own
mask for that task and tensor (``tensor_seed``), so both tools prune the same entries; tvq
runs with ``rescale_mode=l1``, which is mergekit's rescaling.
"""

from __future__ import annotations

import argparse

import torch

from tvq.merge import merge_state_dict
from tvq.merge.methods.della import keep_probability
from tvq.merge.ops import tensor_seed
from tvq.vector import TaskVector

SHAPES = {"emb.weight": (50, 32), "layer.0.w": (64, 48), "layer.0.b": (64,), "conv.weight": (8, 6, 3, 3), "layer.1.w": (48, 64)}


def make_inputs(tasks: int, seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    shared = {k: 0.02 * torch.randn(s, generator=g) for k, s in SHAPES.items()}  # a common direction: cos θ > 0
    fts = [{k: pre[k] + shared[k] + 0.02 * (t + 1) * torch.randn(s, generator=g) for k, s in SHAPES.items()} for t in range(tasks)]
    return pre, fts


def _tied(mag: torch.Tensor) -> torch.Tensor:
    """Entries whose |τ| equals another entry's in the same row (mergekit's rows: dimension 1)."""
    rows = mag.reshape(1, -1) if mag.dim() < 2 else mag.movedim(1, -1).reshape(-1, mag.shape[1])
    ordered = rows.sort(dim=1).values
    count = torch.searchsorted(ordered, rows, right=True) - torch.searchsorted(ordered, rows, right=False)
    shape = mag.shape if mag.dim() < 2 else mag.movedim(1, -1).shape
    out = (count > 1).reshape(shape)
    return out if mag.dim() < 2 else out.movedim(-1, 1)


def mergekit_tensor(name: str, pre: torch.Tensor, fts: list[torch.Tensor], **params) -> torch.Tensor:
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get

    group = TensorGroup.from_tensors([pre, *fts], base_index=0)
    ids = [e.id for e in group.non_base]
    per_input = {k: dict.fromkeys(ids, params.pop(k)) for k in ("weight", "density", "epsilon", "gamma") if k in params}
    return get(name).merge_group(group, **params, **per_input)


def report(label: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    rel = float((ours - theirs).norm() / theirs.norm().clamp(min=1e-30))
    print(f"  {label:<14} rel L2 {rel:.2e}  max |Δ| {float((ours - theirs).abs().max()):.2e}  equal {torch.equal(ours, theirs)}")
    return rel


def compare_model_stock(pre, fts, tvs) -> float:
    worst = 0.0
    for filter_wise in (False, True):
        print(f"model_stock filter_wise={filter_wise}")
        ours = merge_state_dict("model_stock", pre, tvs, {"filter_wise": filter_wise})
        for key in SHAPES:
            theirs = mergekit_tensor("model_stock", pre[key], [f[key] for f in fts], filter_wise=filter_wise)
            worst = max(worst, report(key, ours[key], theirs))
    return worst


def compare_della(pre, fts, tvs, density: float, epsilon: float, lam: float) -> tuple[float, float]:
    import mergekit.sparsify as sparsify

    worst, worst_p, tied = 0.0, 0.0, 0
    names = list(tvs)
    for method, normalize in (("della", True), ("della_linear", False)):
        print(f"{method} density={density} epsilon={epsilon} lambda={lam} (tvq rescale_mode=l1)")
        options = {"density": density, "epsilon": epsilon, "lambda": lam, "rescale_mode": "l1", "seed": 5, "normalize": normalize}
        ours = merge_state_dict(method, pre, tvs, options)
        for key in SHAPES:
            calls = iter(range(len(names)))
            original = sparsify.torch.bernoulli

            def fake_bernoulli(probs, key=key, calls=calls):
                t = next(calls)
                tau = tvs[names[t]][key]
                mine = keep_probability(tau, density, epsilon)
                nonlocal worst_p, tied
                off = (mine.reshape(probs.shape) - probs).abs()
                ties = _tied(tau.reshape(probs.shape).abs())
                tied += int((off[ties] > 0).sum())
                worst_p = max(worst_p, float(off[~ties].max()))
                gen = torch.Generator().manual_seed(tensor_seed(5, names[t], key))
                return (torch.rand(tau.shape, generator=gen) < mine).to(probs.dtype).reshape(probs.shape)

            sparsify.torch.bernoulli = fake_bernoulli
            try:
                theirs = mergekit_tensor(method, pre[key], [f[key] for f in fts], weight=1.0, density=density, epsilon=epsilon,
                                         normalize=normalize, rescale=True, int8_mask=False, **{"lambda": lam})  # fmt: skip
            finally:
                sparsify.torch.bernoulli = original
            worst = max(worst, report(key, ours[key], theirs))
    print(f"  largest |p_keep(tvq) - p_keep(mergekit)| off ties: {worst_p:.2e}; entries tied in |τ| that differ: {tied}")
    return worst, worst_p


def compare_breadcrumbs_ties(pre, fts, tvs, density: float, gamma: float) -> float:
    print(f"breadcrumbs_ties density={density} gamma={gamma} (tvq scope=tensor aggregate=sum lambda=1)")
    worst = 0.0
    ours = merge_state_dict("breadcrumbs_ties", pre, tvs, {"density": density, "gamma": gamma, "lambda": 1.0})
    for key in SHAPES:
        theirs = mergekit_tensor("breadcrumbs_ties", pre[key], [f[key] for f in fts], weight=1.0, density=density, gamma=gamma,
                                 normalize=False, rescale=False, int8_mask=False, **{"lambda": 1.0})  # fmt: skip
        worst = max(worst, report(key, ours[key], theirs))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import mergekit

    print(f"mergekit {getattr(mergekit, '__version__', '?')} from {mergekit.__file__}")
    pre, fts = make_inputs(args.tasks, args.seed)
    tvs = {f"task{t}": TaskVector.from_state_dict({k: ft[k] - pre[k] for k in SHAPES}) for t, ft in enumerate(fts)}
    ms = compare_model_stock(pre, fts, tvs)
    della, p = compare_della(pre, fts, tvs, density=0.5, epsilon=0.1, lam=1.1)
    bt = compare_breadcrumbs_ties(pre, fts, tvs, density=0.3, gamma=0.05)
    print(f"\nworst rel L2: model_stock {ms:.2e}, della/della_linear {della:.2e} (p_keep off ties {p:.2e}), breadcrumbs_ties {bt:.2e}")


if __name__ == "__main__":
    main()
