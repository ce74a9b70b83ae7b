"""Top-k tie rules on the text benchmark (issue 14): ``tie_rule=exact`` against ``keep_ties``.

TIES (global and per tensor) and Breadcrumbs at the paper's fixed options (λ = 0.3), from TVQ
packs of each precision (made once under ``--out/packs`` by tvq.bench.matrix.Matrix) and from
the FP32 checkpoints; test and validation accuracy and the density each merge kept. Results
are cached in ``--out/topk_rules.json``; one torch thread (the machine is shared).

    python benchmarks/topk_tie_rules.py --run ~/.cache/tvq/bench/runs/ci --out /tmp/topk --precisions tvq2,tvq3,tvq4,fp32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CONFIGS = {
    "ties (global)": ("ties", {"density": 0.2, "lambda": 0.3}),
    "ties (tensor)": ("ties", {"density": 0.2, "lambda": 0.3, "scope": "tensor"}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.1, "gamma": 0.01, "lambda": 0.3}),
    "breadcrumbs d=0.2": ("breadcrumbs", {"density": 0.2, "gamma": 0.01, "lambda": 0.3}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path.home() / ".cache/tvq/bench/runs/ci", help="a `tvq bench build` run folder")
    parser.add_argument("--out", type=Path, default=Path("topk-tie-rules"), help="packs, merged model and results")
    parser.add_argument("--precisions", default="tvq2,tvq3,tvq4,fp32")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from tvq.bench.matrix import Matrix
    from tvq.merge import merge

    matrix = Matrix(args.run, args.out, progress=False)
    path = args.out / "topk_rules.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    labels = [c.strip() for c in args.configs.split(",")]
    for precision in args.precisions.split(","):
        vectors = matrix.task_vectors(precision)
        for label in labels:
            method, options = CONFIGS[label]
            for rule in ("exact", "keep_ties"):
                key = f"{label}|{precision}|{rule}"
                if key not in results:
                    t0 = time.perf_counter()
                    out = args.out / "merged.safetensors"
                    report = merge(method, matrix.run.pretrained_path, vectors, out, {**options, "tie_rule": rule}, overwrite=True)
                    acc = {split: matrix.run.evaluate_all(out, split) for split in ("test", "validation")}
                    k = report.kept
                    results[key] = {"acc": acc, "kept": k.overall, "kept_mean": k.mean, "kept_min": k.min, "kept_max": k.max,
                                    "seconds": time.perf_counter() - t0}  # fmt: skip
                    path.write_text(json.dumps(results, indent=1))
                r = results[key]
                test, val = (100 * sum(a.values()) / len(a) for a in (r["acc"]["test"], r["acc"]["validation"]))
                print(f"| {label} | {precision} | {rule} | {100 * r['kept']:.1f} % | {100 * r['kept_mean']:.1f} / "
                      f"{100 * r['kept_min']:.1f} / {100 * r['kept_max']:.1f} % | {test:.2f} | {val:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
