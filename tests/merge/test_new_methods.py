"""TSV-Merge, Iso-C, Iso-CTS, Model Stock, DELLA and breadcrumbs_ties.

Each is checked against a reference written here from its paper's equations (numpy, float64,
on literal or seeded tensors), then run from every pack kind, through the CLI from packs and
from FP32 checkpoints, and shown to give the same bytes with 1 and 2 threads.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tvq.cli import app
from tvq.errors import ConfigError
from tvq.execute import LocalExecutor
from tvq.merge import load_task_vectors, merge, merge_state_dict
from tvq.merge.methods.breadcrumbs import BreadcrumbsRowsWarning
from tvq.merge.methods.della import keep_probability, magprune_
from tvq.merge.methods.tsv import SpectralKernelsWarning
from tvq.merge.ops import tensor_seed
from tvq.pack.reader import open_pack
from tvq.vector import TaskVector

from merge_helpers import finetuned, make_pack, small_model, tv

NEW_METHODS = ["tsv_merge", "iso_c", "iso_cts", "model_stock", "della", "della_linear", "breadcrumbs_ties"]
runner = CliRunner()


def merged(method: str, vectors: dict, **options) -> dict[str, torch.Tensor]:
    first = next(iter(vectors.values()))
    pre = {k: torch.zeros(first[k].shape) for k in first}
    return merge_state_dict(method, pre, vectors, options)


def seeded(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def vectors_of(**per_task: dict[str, torch.Tensor]) -> dict[str, TaskVector]:
    return {name: TaskVector.from_state_dict(sd) for name, sd in per_task.items()}


def close(actual: torch.Tensor, expected: np.ndarray | float, tol: float = 1e-5) -> None:
    expected_t = torch.as_tensor(np.asarray(expected), dtype=torch.float32)
    torch.testing.assert_close(actual, expected_t, rtol=tol, atol=tol * float(expected_t.abs().max().clamp(min=1)))


# -- references from the papers' equations (numpy, float64) -------------------------------


def np_polar(x: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def ref_tsv(taus: list[np.ndarray]) -> np.ndarray:
    """TSV-M (Gargiulo et al. 2025, Alg. 1): per task the top ⌊r/T⌋ singular triplets,
    concatenated; U and V orthogonalised; δ = Û diag(S) V̂ᵀ."""
    m, n = taus[0].shape
    r, T = min(m, n), len(taus)
    k = r // T
    U, S, V = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, tau in enumerate(taus):
        u, s, vt = np.linalg.svd(tau, full_matrices=False)
        U[:, i * k : (i + 1) * k], S[i * k : (i + 1) * k], V[i * k : (i + 1) * k] = u[:, :k], s[:k], vt[:k]
    return np_polar(U) @ np.diag(S) @ np_polar(V)


def ref_iso_c(taus: list[np.ndarray]) -> np.ndarray:
    """Iso-C (Marczak et al. 2025, eq. 5): Σ_t τ_t = U S Vᵀ → σ̄ U Vᵀ with σ̄ the mean singular value."""
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    return s.mean() * u @ vt


def ref_iso_cts(taus: list[np.ndarray], fraction: float) -> np.ndarray:
    """Iso-CTS (Marczak et al. 2025, Alg. 1): the top-c directions of Σ_t τ_t, plus d = (r − c)/T
    directions of each task's residual outside them; orthogonalised; isotropic spectrum."""
    m, n = taus[0].shape
    r, T = min(m, n), len(taus)
    c = int(r * fraction)
    c = r - round((r - c) / T) * T
    d = (r - c) // T
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    Us, Ss, Vs = [], [], []
    for tau in taus:
        resid = tau - u[:, :c] @ u[:, :c].T @ tau
        ut, st, vtt = np.linalg.svd(resid, full_matrices=False)
        Us.append(ut[:, :d]), Ss.append(st[:d]), Vs.append(vtt[:d])
    U = np.concatenate([*Us, u[:, :c]], axis=1)
    S = np.concatenate([*Ss, s[:c]])
    V = np.concatenate([*Vs, vt[:c]], axis=0)
    return S.mean() * np_polar(U) @ np_polar(V)


def ref_model_stock(taus: list[np.ndarray]) -> np.ndarray:
    """Model Stock (Jang et al. 2024, eq. 4 with mergekit's multi-model angle): mean pairwise
    cos θ, t = N cos θ / (1 + (N − 1) cos θ), δ = t · mean_t τ_t."""
    flat = [t.reshape(-1) for t in taus]
    n = len(flat)
    cos = np.mean([flat[i] @ flat[j] / max(np.linalg.norm(flat[i]) * np.linalg.norm(flat[j]), 1e-6)
                   for i in range(n) for j in range(i + 1, n)])  # fmt: skip
    t = n * cos / (1 + (n - 1) * cos)
    return t * np.mean(taus, axis=0)


def ref_keep_probability(row: np.ndarray, density: float, eps: float) -> np.ndarray:
    """MagPrune (Deep et al. 2024, §3): rank |τ| ascending (ties share their mean rank), map
    ranks 0 … n−1 linearly onto keep probabilities density − ε … density + ε."""
    mag = np.abs(row)
    n = len(mag)
    rank = np.array([((mag < v).sum() + (mag <= v).sum() - 1) / 2 for v in mag])
    return density - eps + 2 * eps * rank / (n - 1)


def ref_della(taus: dict[str, np.ndarray], masks: dict[str, np.ndarray], probs: dict[str, np.ndarray],
              weights: dict[str, float], lam: float, consensus: bool, normalize: bool) -> np.ndarray:  # fmt: skip
    """Drop, rescale by 1/p, weight; elect sign(Σ) (≥ 0 → +), disjoint weighted mean (della) or sum (della_linear)."""
    pruned = {t: taus[t] * masks[t] / probs[t] * weights[t] for t in taus}
    if not consensus:
        total = sum(pruned.values())
        return lam * (total / sum(weights.values()) if normalize else total)
    sign = np.where(sum(pruned.values()) >= 0, 1.0, -1.0)
    agree = {t: np.sign(p) == sign for t, p in pruned.items()}
    total = sum(pruned[t] * agree[t] for t in taus)
    divisor = sum(weights[t] * agree[t] for t in taus)
    return lam * (total / np.where(divisor == 0, 1.0, divisor) if normalize else total)


# -- the SVD methods ------------------------------------------------------------------------

SVD_SHAPES = {"w": (24, 18), "wide": (12, 20), "gap": (20, 16)}  # gap: 3 tasks × 5 of 16 directions


@pytest.fixture(scope="module")
def svd_vectors() -> dict[str, TaskVector]:
    tasks = {}
    for t in range(3):
        sd = {k: seeded(s, 10 * t + i) for i, (k, s) in enumerate(SVD_SHAPES.items())}
        sd.update(bias=seeded((18,), 50 + t), conv=seeded((4, 3, 2, 2), 60 + t), scale=seeded((), 70 + t),
                  head=seeded((2, 18), 80 + t), **{"text_projection.weight": seeded((6, 6), 90 + t)})  # fmt: skip
        tasks[f"t{t}"] = TaskVector.from_state_dict(sd)
    return tasks


def np_taus(vectors: dict[str, TaskVector], key: str) -> list[np.ndarray]:
    return [v[key].double().numpy() for v in vectors.values()]


@pytest.mark.parametrize(("method", "reference"), [("tsv_merge", ref_tsv), ("iso_c", ref_iso_c), ("iso_cts", lambda t: ref_iso_cts(t, 0.8))])
def test_svd_methods_match_the_papers_equations(svd_vectors, method, reference):
    out = merged(method, svd_vectors, **{"lambda": 1.0})
    for key in SVD_SHAPES:
        close(out[key], reference(np_taus(svd_vectors, key)), tol=2e-5)
    mean = np.mean(np_taus(svd_vectors, "bias"), axis=0)
    close(out["bias"], mean)  # non-matrix tensors: the mean of the task vectors
    close(out["conv"], np.mean(np_taus(svd_vectors, "conv"), axis=0))
    close(out["scale"], np.mean(np_taus(svd_vectors, "scale"), axis=0))
    # the references average 2-D "text_projection" tensors; exclude_keys=[] decomposes them
    close(out["text_projection.weight"], np.mean(np_taus(svd_vectors, "text_projection.weight"), axis=0))
    decomposed = merged(method, svd_vectors, exclude_keys=[], **{"lambda": 1.0})
    close(decomposed["text_projection.weight"], reference(np_taus(svd_vectors, "text_projection.weight")), tol=2e-5)
    scaled = merged(method, svd_vectors, **{"lambda": 0.5})
    close(scaled["w"], 0.5 * out["w"].double().numpy())


def test_tsv_keeps_each_tasks_top_directions_and_averages_thin_matrices(svd_vectors):
    # two tasks with orthogonal rank-1 updates: TSV keeps both exactly (no interference to whiten)
    a, b = np.zeros((6, 4)), np.zeros((6, 4))
    a[0, 0], b[1, 1] = 3.0, 2.0
    out = merged("tsv_merge", vectors_of(a={"w": torch.tensor(a, dtype=torch.float32)}, b={"w": torch.tensor(b, dtype=torch.float32)}),
                 **{"lambda": 1.0})  # fmt: skip
    close(out["w"], a + b)
    # a 2 x 18 head from 3 tasks has r = 2 < T: the reference gives it k = 0 directions (a zero
    # update); tvq averages it like the non-matrix tensors
    close(merged("tsv_merge", svd_vectors, **{"lambda": 1.0})["head"], np.mean(np_taus(svd_vectors, "head"), axis=0))


def test_iso_c_flattens_the_spectrum_of_the_task_sum(svd_vectors):
    out = merged("iso_c", svd_vectors, **{"lambda": 1.0})["w"].double().numpy()
    s = np.linalg.svd(out, compute_uv=False)
    total = np.linalg.svd(sum(np_taus(svd_vectors, "w")), compute_uv=False)
    np.testing.assert_allclose(s, np.full_like(s, total.mean()), rtol=1e-4)  # isotropic, same mean


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_iso_cts_fractions(svd_vectors, fraction):
    out = merged("iso_cts", svd_vectors, common_space_fraction=fraction, **{"lambda": 1.0})
    close(out["w"], ref_iso_cts(np_taus(svd_vectors, "w"), fraction), tol=2e-5)
    if fraction == 1.0:  # all directions common: Iso-C
        close(out["w"], ref_iso_c(np_taus(svd_vectors, "w")), tol=2e-5)


# -- Model Stock ------------------------------------------------------------------------------


def test_model_stock_ratio_from_the_angle():
    # cos θ = 24/25, N = 2: t = 2·0.96 / 1.96; δ = t · mean τ
    out = merged("model_stock", {"a": tv(w=[3.0, 4.0]), "b": tv(w=[4.0, 3.0])})
    t = 2 * 0.96 / 1.96
    close(out["w"], [3.5 * t, 3.5 * t])
    close(merged("model_stock", {"a": tv(w=[1.0, 0.0]), "b": tv(w=[0.0, 1.0])})["w"], [0.0, 0.0])  # orthogonal: t = 0
    close(merged("model_stock", {"a": tv(w=[1.0, 2.0]), "b": tv(w=[-1.0, -2.0])})["w"], [0.0, 0.0])  # 1 + cos θ = 0: θ_pre
    close(merged("model_stock", {"a": tv(w=[0.0, 0.0]), "b": tv(w=[1.0, 1.0])})["w"], [0.0, 0.0])  # zero norm: cos θ = 0


def test_model_stock_matches_the_formula_on_many_tasks_and_per_row():
    taus = {f"t{i}": {"w": seeded((5, 7), i, 0.1) + 0.1, "b": seeded((7,), 20 + i) + 1} for i in range(4)}
    out = merged("model_stock", vectors_of(**taus))
    for key in ("w", "b"):
        close(out[key], ref_model_stock([taus[t][key].double().numpy() for t in taus]))
    rows = merged("model_stock", vectors_of(**taus), filter_wise=True)["w"]
    for r in range(5):  # filter-wise: one angle (and t) per row of the last dimension
        close(rows[r], ref_model_stock([taus[t]["w"][r].double().numpy() for t in taus]))


def test_model_stock_needs_two_task_vectors():
    with pytest.raises(ConfigError, match="at least two task vectors"):
        merged("model_stock", {"a": tv(w=[1.0, 2.0])})


# -- DELLA ------------------------------------------------------------------------------------


def test_magprune_keep_probabilities_rank_by_magnitude():
    row = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.1])
    close(keep_probability(row, 0.5, 0.1), [0.45, 0.6, 0.5, 0.55, 0.4])  # ranks 1, 4, 2, 3, 0 of 4
    close(keep_probability(torch.tensor([1.0, -1.0, 2.0, 0.0]), 0.5, 0.1), [0.5, 0.5, 0.6, 0.4])  # ties: mean rank 1.5
    matrix = seeded((3, 6), 1)
    close(keep_probability(matrix, 0.3, 0.05), np.stack([ref_keep_probability(r, 0.3, 0.05) for r in matrix.double().numpy()]))
    conv = seeded((2, 5, 3), 2)  # mergekit ranks along dimension 1
    expected = np.empty(conv.shape)
    for i in range(2):
        for j in range(3):
            expected[i, :, j] = ref_keep_probability(conv[i, :, j].double().numpy(), 0.3, 0.05)
    close(keep_probability(conv, 0.3, 0.05), expected)
    close(keep_probability(torch.tensor(2.0), 0.3, 0.05), 0.3)  # one entry: kept with probability density


@pytest.mark.parametrize(("method", "consensus", "normalize"), [("della", True, True), ("della", True, False),
                                                                ("della_linear", False, False), ("della_linear", False, True)])  # fmt: skip
def test_della_matches_the_equations_with_its_seeded_masks(method, consensus, normalize):
    taus = {t: {"w": seeded((4, 9), i, 0.1), "b": seeded((9,), 10 + i, 0.1)} for i, t in enumerate(("x", "y", "z"))}
    density, epsilon, weights, seed = {"x": 0.5, "y": 0.6, "z": 0.4}, 0.1, {"x": 1.0, "y": 0.5, "z": 2.0}, 3
    out = merged(method, vectors_of(**taus), density=density, epsilon=epsilon, weight=weights, seed=seed, normalize=normalize,
                 **{"lambda": 0.7})  # fmt: skip
    for key in ("w", "b"):
        probs, masks = {}, {}
        for t in taus:
            tau = taus[t][key].double().numpy()
            probs[t] = np.stack([ref_keep_probability(r, density[t], epsilon) for r in np.atleast_2d(tau)]).reshape(tau.shape)
            draw = torch.rand(tau.shape, generator=torch.Generator().manual_seed(tensor_seed(seed, t, key))).double().numpy()
            masks[t] = draw < probs[t]  # the mask is seeded per (seed, task, tensor), like DARE's
        expected = ref_della({t: taus[t][key].double().numpy() for t in taus}, masks, probs, weights, 0.7, consensus, normalize)
        close(out[key], expected)


def test_della_rescales_to_the_l1_norm_like_mergekit():
    tau = seeded((40,), 5)
    pruned = magprune_(tau.clone(), 0.5, 0.2, seed=11, rescale=True, mode="l1")
    kept = pruned != 0
    assert 0 < int(kept.sum()) < 40
    close(pruned.abs().sum(), tau.abs().sum())
    close(pruned[kept], (tau[kept] * tau.abs().sum() / tau[kept].abs().sum()).numpy())
    assert torch.equal(magprune_(tau.clone(), 0.5, 0.2, seed=11, rescale=False, mode="l1"), torch.where(kept, tau, 0.0))


def test_magprune_is_unbiased_and_its_mask_depends_on_seed_task_and_tensor_only():
    tau = torch.tensor([0.1, -0.4, 1.0, -2.0, 0.7, 3.0, -0.05, 0.3])
    mean = torch.stack([magprune_(tau.clone(), 0.5, 0.1, seed=s, rescale=True, mode="probability") for s in range(4000)]).mean(0)
    close(mean, tau.numpy(), tol=0.12)  # E[τ·m/p] = τ
    # della_linear (a plain weighted sum) of two tasks = the sum of each alone: the masks do not
    # depend on the other tasks; and on the task's name, not its position
    va, vb = {"w": seeded((6, 5), 1)}, {"w": seeded((6, 5), 2)}
    both = merged("della_linear", vectors_of(a=va, b=vb), **{"lambda": 1.0})["w"]
    alone = merged("della_linear", vectors_of(a=va), **{"lambda": 1.0})["w"] + merged("della_linear", vectors_of(b=vb), **{"lambda": 1.0})["w"]
    assert torch.equal(both, alone)
    swapped = merged("della_linear", vectors_of(b=vb, a=va), **{"lambda": 1.0})["w"]
    b_alone = merged("della_linear", vectors_of(b=vb), **{"lambda": 1.0})["w"]
    assert torch.equal(swapped, b_alone + merged("della_linear", vectors_of(a=va), **{"lambda": 1.0})["w"])
    other_seed = merged("della_linear", vectors_of(a=va), seed=1, **{"lambda": 1.0})["w"]
    assert not torch.equal(other_seed, merged("della_linear", vectors_of(a=va), **{"lambda": 1.0})["w"])


def test_della_density_edges():
    vectors = {"a": tv(w=[2.0, -1.0, 0.5]), "b": tv(w=[-1.0, -1.0, 1.5])}
    # density 1: no pruning, only the election: signs [+, −, +]; agreeing entries 2 | −1, −1 | 0.5, 1.5
    close(merged("della", vectors, density=1.0, **{"lambda": 1.0})["w"], [2.0, -1.0, 1.0])
    close(merged("della", vectors, density=0.0, **{"lambda": 1.0})["w"], [0.0, 0.0, 0.0])
    close(merged("della", {"a": tv(w=[2.0]), "b": tv(w=[-2.0])}, density=1.0, **{"lambda": 1.0})["w"], [2.0])  # a zero sum elects +


@pytest.mark.parametrize(("options", "message"), [
    ({"density": 0.95}, "density ± epsilon inside (0, 1)"),
    ({"density": 0.05, "epsilon": 0.05}, "density ± epsilon inside (0, 1)"),
    ({"weight": {"a": 1.0}}, "weight must name every task exactly"),
    ({"density": 1.5}, "density must be in [0, 1]"),
    ({"epsilon": -0.1}, "epsilon must be >= 0"),
    ({"lambda": float("nan")}, "lambda"),
])  # fmt: skip
def test_della_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        merged("della", {"a": tv(w=[1.0, 2.0]), "b": tv(w=[2.0, 1.0])}, **options)


# -- breadcrumbs_ties -------------------------------------------------------------------------


def test_breadcrumbs_ties_masks_then_elects():
    vectors = {"a": tv(w=[4, -1, 0.5, -3, 2]), "b": tv(w=[-2, 3, 1, -0.5, 0.2]), "c": tv(w=[1, -2, -4, 0.1, 3])}
    # per tensor, drop the top int(0.2·5) = 1, keep the next int(0.4·5) = 2:
    # a → [0,0,0,−3,2], b → [−2,0,1,0,0], c → [0,−2,0,0,3]; sums [−2,−2,1,−3,5] elect [−,−,+,−,+]
    close(merged("breadcrumbs_ties", vectors, density=0.4, gamma=0.2, **{"lambda": 1.0})["w"], [-2, -2, 1, -3, 5])
    close(merged("breadcrumbs_ties", vectors, density=0.4, gamma=0.2, aggregate="mean", **{"lambda": 1.0})["w"], [-2, -2, 1, -3, 2.5])
    close(merged("breadcrumbs_ties", vectors, density=0.4, gamma=0.2)["w"], [-0.6, -0.6, 0.3, -0.9, 1.5])  # λ = 0.3


def test_breadcrumbs_ties_is_breadcrumbs_when_signs_agree():
    same = {t: {"w": seeded((6, 10), i).abs()} for i, t in enumerate("abc")}  # all positive: nothing to elect away
    opts = {"density": 0.3, "gamma": 0.1, "scope": "row", "lambda": 1.0}
    assert torch.equal(merged("breadcrumbs_ties", vectors_of(**same), **opts)["w"], merged("breadcrumbs", vectors_of(**same), **opts)["w"])


# -- packs, checkpoints, the CLI, threads -----------------------------------------------------


def model_with_a_big_matrix() -> dict[str, torch.Tensor]:
    """small_model plus a 288 x 256 matrix: big enough that MKL's SVD and torch's reductions
    change bits with the thread count unless pinned."""
    sd = small_model()
    sd["big.weight"] = seeded((288, 256), 123, 0.05)
    return sd


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("new-methods")
    pre = model_with_a_big_matrix()
    save_file(pre, root / "pre.safetensors")
    paths = {}
    for i in range(3):
        paths[f"t{i}"] = root / f"t{i}.safetensors"
        save_file(finetuned(pre, i), paths[f"t{i}"])
    ckpts = {"pre_path": root / "pre.safetensors", "ft_paths": paths}
    packs = {
        "tvq": make_pack(ckpts, root / "tvq4", bits=4),
        "rtvq": make_pack(ckpts, root / "rtvq", bits=2, residual=True, base_bits=3, error_correction=True),
        "fq": make_pack(ckpts, root / "fq8", bits=8, target="finetuned"),
    }
    return {"root": root, "pre": pre, **ckpts, "packs": packs}


def dequantized(pack_path: Path, pre_path: Path) -> dict[str, TaskVector]:
    pack = open_pack(pack_path, pre_path)
    return {t: TaskVector.from_state_dict(pack.task_vector(t).materialize(), name=t) for t in pack.tasks}


@pytest.mark.parametrize("method", NEW_METHODS)
def test_every_pack_kind_merges_like_its_dequantized_vectors(inputs, method):
    for kind, pack_path in inputs["packs"].items():
        pre, from_pack = load_task_vectors(inputs["pre_path"], packs=[pack_path])
        streamed = merge_state_dict(method, pre, from_pack)
        reference = merge_state_dict(method, inputs["pre"], dequantized(pack_path, inputs["pre_path"]))
        assert streamed.keys() == reference.keys() == inputs["pre"].keys()
        for key in streamed:
            assert torch.equal(streamed[key], reference[key]), (kind, key)
        assert not torch.equal(streamed["big.weight"], inputs["pre"]["big.weight"])


def cli(*args) -> object:
    result = runner.invoke(app, ["merge", *map(str, args), "--no-progress"])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("method", NEW_METHODS)
def test_cli_from_packs_and_checkpoints_same_bytes_on_1_and_2_threads(inputs, tmp_path, method):
    ft_args = [a for name, p in inputs["ft_paths"].items() for a in ("-f", f"{name}={p}")]
    for label, source in (("pack", ["--pack", inputs["packs"]["rtvq"]]), ("fp32", ft_args)):
        outs = []
        for threads in (1, 2):
            out = tmp_path / f"{label}-{threads}.safetensors"
            cli("--method", method, *source, "-p", inputs["pre_path"], "--out", out, "--threads", threads)
            outs.append(out)
        assert outs[0].read_bytes() == outs[1].read_bytes(), label
        if label == "fp32":  # the CLI's model is the API's
            pre, vectors = load_task_vectors(inputs["pre_path"], finetuned=inputs["ft_paths"])
            expected, written = merge_state_dict(method, pre, vectors), load_file(outs[0])
            assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)


class PicklingExecutor:
    """Every job pickled and unpickled, as Ray ships them (the prepared method travels inside)."""

    remote = True

    def map(self, fn, jobs):
        for job in jobs:
            yield fn(pickle.loads(pickle.dumps(job)))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_threads_and_shipped_jobs_write_the_same_model(inputs, tmp_path, method):
    def run(executor, name):
        pre, vectors = load_task_vectors(inputs["pre_path"], packs=[inputs["packs"]["tvq"]])
        return merge(method, pre, vectors, tmp_path / name, executor=executor).out.read_bytes()

    assert run(None, "serial.safetensors") == run(LocalExecutor(threads=2), "threads.safetensors") == run(PicklingExecutor(), "shipped.safetensors")


def test_help_lists_the_new_methods_and_their_memory_needs():
    result = runner.invoke(app, ["merge", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for line in (
        "tsv_merge (tsv, tsv_m, tsvm, task_singular_vectors): lambda=1.0",
        "iso_c (iso, isotropic, iso_c_merge): lambda=1.0",
        "common_space_fraction=0.8",
        "model_stock: filter_wise=False",
        "della (della_ties, della_merging): density=0.7, epsilon=0.07, lambda=1.1",
        "della_linear: density=0.7",
        "breadcrumbs_ties (model_breadcrumbs_ties): density=0.1, gamma=0.01, lambda=0.3, scope=tensor",
    ):
        assert line in text, line
    assert text.count("each task's matrix dense") == 3  # the SVD methods say what they hold


def test_cli_options_and_errors(inputs, tmp_path):
    out = tmp_path / "m.safetensors"
    cli("--method", "della", "--pack", inputs["packs"]["tvq"], "-p", inputs["pre_path"], "--out", out,
        "--density", "0.5", "--epsilon", "0.2", "--weight", "{t0: 1.0, t1: 0.5, t2: 2}", "--rescale-mode", "l1")  # fmt: skip
    pre, vectors = load_task_vectors(inputs["pre_path"], packs=[inputs["packs"]["tvq"]])
    options = {"density": 0.5, "epsilon": 0.2, "weight": {"t0": 1.0, "t1": 0.5, "t2": 2.0}, "rescale_mode": "l1"}
    expected = merge_state_dict("della", pre, vectors, options)
    assert all(torch.equal(load_file(out)[k], expected[k]) for k in expected)
    cli("--method", "tsv", "--pack", inputs["packs"]["tvq"], "-p", inputs["pre_path"], "--out", tmp_path / "t.safetensors",
        "--exclude-keys", "['big.*']", "--lambda", "2")  # fmt: skip
    written = load_file(tmp_path / "t.safetensors")
    mean = merge_state_dict("average", pre, vectors)
    big = inputs["pre"]["big.weight"]
    torch.testing.assert_close(written["big.weight"] - big, 2 * (mean["big.weight"] - big), rtol=1e-5, atol=1e-6)  # excluded: averaged
    result = runner.invoke(app, ["merge", "--method", "iso_cts", "--pack", str(inputs["packs"]["tvq"]), "-p", str(inputs["pre_path"]),
                                 "--out", str(tmp_path / "x"), "--common-space-fraction", "1.5", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2 and "common_space_fraction" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["merge", "--method", "model_stock", "--pack", str(inputs["packs"]["tvq"]), "-p", str(inputs["pre_path"]),
                                 "--out", str(tmp_path / "y"), "--lambda", "0.5", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2 and "unknown option 'lambda'" in result.output


@pytest.mark.parametrize("method", ["tsv_merge", "iso_c", "iso_cts"])
def test_conv_kernels_are_averaged_as_the_references_or_decomposed_when_asked(method):
    """A CNN's weights are 4-D: by default they are averaged (as the references do, so a CNN
    merges as weight averaging); kernels=flatten decomposes each as its (out, in·k·k) matrix."""
    kernels = {f"t{i}": {"conv.weight": seeded((6, 4, 3, 3), i)} for i in range(3)}
    flat = {t: {"conv.weight": v["conv.weight"].reshape(6, 36)} for t, v in kernels.items()}
    vectors, flat_vectors = vectors_of(**kernels), vectors_of(**flat)
    with pytest.warns(SpectralKernelsWarning, match="1 conv kernels or other >2-D weights"):
        averaged = merged(method, vectors)["conv.weight"]
    close(averaged, np.mean([v["conv.weight"].numpy() for v in kernels.values()], axis=0))
    decomposed = merged(method, vectors, kernels="flatten")["conv.weight"]
    assert torch.equal(decomposed, merged(method, flat_vectors)["conv.weight"].reshape(6, 4, 3, 3))
    assert not torch.allclose(decomposed, averaged)


def test_breadcrumbs_says_when_its_per_row_cut_keeps_nothing_of_conv_kernels():
    """Rows of 3 entries at density 0.1 keep int(0.3) = 0 entries: the reference's per-row cut
    leaves a CNN's kernels unmerged, and the user is told; per tensor, it keeps them."""
    kernels = {f"t{i}": {"conv.weight": seeded((6, 4, 3, 3), i), "fc.weight": seeded((6, 40), 10 + i)} for i in range(2)}
    vectors = vectors_of(**kernels)
    with pytest.warns(BreadcrumbsRowsWarning, match=r"1 of 2 tensors \(e.g. conv.weight, rows of 3\) keep no entry"):
        per_row = merged("breadcrumbs", vectors)
    assert not per_row["conv.weight"].any() and per_row["fc.weight"].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BreadcrumbsRowsWarning)
        per_tensor = merged("breadcrumbs", vectors, scope="tensor")
        merged("breadcrumbs", vectors, density=0.4)  # int(0.4 * 3) = 1 entry per row: nothing to say
    assert per_tensor["conv.weight"].any()
