"""TIES with per-tensor and global (model-wide) top-k from the packs of a benchmark grid: the test
accuracy of each precision's merge at a few fixed λ, to see how much of a pack's TIES result is the
scope of the trim (issue 15: a budget pack mixing INT2 and INT3 tensors against the fixed widths).

Not a test. Uses a run (``tvq bench build``) and the ``--out`` folder of a ``tvq bench run`` over
it, whose packs it reuses (a precision without a pack there is quantized first, as the grid would).

    python benchmarks/ties_scope.py --run vrun --grid vrun/grid --precisions tvq2,budget-2.375,tvq3,fp32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tvq.bench.matrix import METHODS, PRECISIONS, Matrix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the benchmark run (tvq bench build --out)")
    ap.add_argument("--grid", type=Path, required=True, help="the grid folder (tvq bench run --out): its packs are reused")
    ap.add_argument("--precisions", default="tvq2,budget-2.375,tvq3,fp32")
    ap.add_argument("--lambdas", default="0.3,1.0")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    precisions = args.precisions.split(",")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise SystemExit(f"unknown precision {unknown[0]!r}; known: {', '.join(PRECISIONS)}")
    torch.set_num_threads(args.threads)
    matrix = Matrix(args.run, args.grid, progress=False)
    spec = METHODS["ties"]
    print("| precision | scope | λ | test accuracy (average %) |\n|---|---|---:|---:|")
    for precision in precisions:
        vectors = matrix.task_vectors(precision)
        for scope in ("tensor", "global"):
            for lam in (float(x) for x in args.lambdas.split(",")):
                acc = matrix._evaluate_merge(spec, vectors, {**spec.options, "lambda": lam, "scope": scope}, "test")
                print(f"| {precision} | {scope} | {lam:g} | {100 * sum(acc.values()) / len(acc):.2f} |", flush=True)


if __name__ == "__main__":
    main()
