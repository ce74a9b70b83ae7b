"""tvq's tsv_merge, iso_c and iso_cts vs the authors' own functions, tensor by tensor.

Not a test. The authors' merge functions are plain torch code over dicts of task vectors:
``compute_and_sum_svd_mem_reduction`` in ``src/utils/TSVM_utils.py`` of
AntoAndGar/task_singular_vectors (TSV-Merge) and ``iso_c`` / ``iso_cts`` in ``src/utils/iso.py``
of danielm1405/iso-merging. Point this script at those two files of a checkout (they are
loaded from their paths, never copied into tvq):

    python benchmarks/compare_svd_references.py --tsv task_singular_vectors/src/utils/TSVM_utils.py \\
        --iso iso-merging/src/utils/iso.py

Both tools get the same fp32 task vectors (transformer-shaped: matrices, biases, a conv
kernel, a ``text_projection`` matrix, a head with fewer rows than tasks) and the merged
vectors are compared with α = 1 (tvq ``lambda=1``; the references scale at evaluation time).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
from pathlib import Path
from types import SimpleNamespace

import torch

from tvq.merge import merge_state_dict
from tvq.vector import TaskVector

SHAPES = {
    "blocks.0.attn.in_proj_weight": (192, 64),
    "blocks.0.attn.in_proj_bias": (192,),
    "blocks.0.mlp.c_fc.weight": (256, 64),
    "blocks.0.mlp.c_proj.weight": (64, 256),
    "blocks.0.ln_1.weight": (64,),
    "conv1.weight": (64, 3, 4, 4),
    "proj": (64, 48),
    "text_projection": (48, 48),
    "head.weight": (5, 64),  # r = 5 < T = 8: the reference gives TSV no directions here
}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_vectors(tasks: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shared = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    out = []
    for _ in range(tasks):  # low-rank-ish task matrices around a shared direction, as fine-tunes are
        tv = {}
        for k, s in SHAPES.items():
            if len(s) == 2:
                rank = max(1, min(s) // 4)
                tv[k] = 0.01 * (shared[k] + torch.randn(s[0], rank, generator=g) @ torch.randn(rank, s[1], generator=g))
            else:
                tv[k] = 0.01 * (shared[k] + torch.randn(s, generator=g))
        out.append(tv)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tsv", type=Path, required=True, help="TSVM_utils.py of AntoAndGar/task_singular_vectors")
    parser.add_argument("--iso", type=Path, required=True, help="iso.py of danielm1405/iso-merging")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tsv_ref, iso_ref = load(args.tsv, "tsv_reference"), load(args.iso, "iso_reference")
    tvs = task_vectors(args.tasks, args.seed)
    names = [f"task{t}" for t in range(args.tasks)]
    config = SimpleNamespace(DATASETS=names, device="cpu", method=SimpleNamespace(common_space_fraction=0.8))
    wrapped = [SimpleNamespace(vector=dict(tv)) for tv in tvs]
    vectors = {n: TaskVector.from_state_dict(tv) for n, tv in zip(names, tvs, strict=True)}
    pre = {k: torch.zeros(s) for k, s in SHAPES.items()}
    runs = {
        "tsv_merge": lambda w: tsv_ref.compute_and_sum_svd_mem_reduction(w, config),
        "iso_c": lambda w: iso_ref.iso_c(w, config),
        "iso_cts": lambda w: iso_ref.iso_cts(w, config),
    }
    torch.set_num_threads(1)
    wrapped64 = [SimpleNamespace(vector={k: v.double() for k, v in tv.items()}) for tv in tvs]
    for method, reference in runs.items():
        with contextlib.redirect_stdout(io.StringIO()):  # the references print every key
            theirs = reference(wrapped)
            exact = reference(wrapped64)  # the reference's own algorithm in float64
        ours = merge_state_dict(method, pre, vectors, {"lambda": 1.0})
        print(f"{method}: rel L2 of tvq vs the reference (fp32), and of each vs the reference in float64")
        for key in SHAPES:
            norm = exact[key].norm()
            if norm == 0:
                print(f"  {key:<30} {str(SHAPES[key]):<15} the reference gives a zero update; tvq |δ| = {float(ours[key].norm()):.3g}")
                continue
            rel = float((ours[key] - theirs[key]).norm() / theirs[key].norm())
            ours64 = float((ours[key].double() - exact[key]).norm() / norm)
            theirs64 = float((theirs[key].double() - exact[key]).norm() / norm)
            print(f"  {key:<30} {str(SHAPES[key]):<15} tvq vs ref {rel:.1e}   vs float64: tvq {ours64:.1e}, ref fp32 {theirs64:.1e}")


if __name__ == "__main__":
    main()
