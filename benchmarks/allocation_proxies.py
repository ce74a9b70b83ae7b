"""Does bit allocation keep accuracy within a fixed scheme's size? Proxies compared in one run.

Issue 15 asks for an allocation that never merges worse than a fixed scheme it could have chosen.
This allocates within the measured bytes of a reference pack (e.g. the run's TVQ INT2 pack) under
several error proxies and evaluates each task with its own quantized task vector (θ_pre + τ̂_t,
the "individual" row of the benchmark):

    python benchmarks/allocation_proxies.py --run ~/.cache/tvq/bench/runs/ci --reference RUN/grid/packs/tvq2 --out /tmp/proxies

Prints a Markdown table: proxy, bytes on disk, average individual accuracy (%).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tvq.bench.evaluate import open_run
from tvq.encode.budget import quantize_within_budget
from tvq.encode.options import QuantizeOptions
from tvq.io.readers import open_checkpoint
from tvq.pack.reader import open_pack
from tvq.report import pack_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a benchmark run folder (tvq bench build)")
    parser.add_argument("--reference", type=Path, required=True, help="the fixed scheme's pack whose size is the budget")
    parser.add_argument("--out", type=Path, required=True, help="where the allocated packs go")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = open_run(args.run)
    budget = pack_summary(args.reference)["total_bytes"]
    pre = open_checkpoint(run.pretrained_path)
    fts = {t: open_checkpoint(run.finetuned_path(t)) for t in run.tasks}
    norm2 = {}  # Σ_t ‖τ_t‖² per tensor: "relative" weighs each tensor's error by it
    for key in pre.keys():  # noqa: SIM118 -- a reader, not a dict
        if pre.meta(key).is_float:
            p = pre.get(key).float()
            norm2[key] = sum(float((f.get(key).float() - p).pow(2).sum()) for f in fts.values())
    relative = {k: 1.0 / max(v, 1e-30) for k, v in norm2.items()}
    rows: list[tuple[str, Path]] = [(f"reference ({args.reference.name})", args.reference)]
    proxies = [
        ("mse or min-max, absolute error", "mse", None),
        ("min-max, absolute error", "minmax", None),
        ("mse or min-max, relative error", "mse", relative),
        ("min-max, relative error", "minmax", relative),
    ]
    for name, quantizer, sensitivity in proxies:
        folder = args.out / name.replace(" ", "_").replace(",", "")
        quantize_within_budget(run.pretrained_path, {t: run.finetuned_path(t) for t in run.tasks}, folder,
                               QuantizeOptions(bits=2, quantizer=quantizer), budget_bytes=budget, sensitivity=sensitivity,
                               progress=False, overwrite=True)  # fmt: skip
        rows.append((name, folder))
    print("| allocation | MB on disk | individual accuracy (%) |\n|---|---|---|")
    base = {k: pre.get(k) for k in pre.keys()}  # noqa: SIM118 -- a reader, not a dict
    for name, folder in rows:
        vectors = open_pack(folder, run.pretrained_path).task_vectors()
        acc = []
        for t in run.tasks:
            state = {k: (v.float() + vectors[t][k]).to(v.dtype) if k in vectors[t] else v for k, v in base.items()}
            acc.append(run.evaluate_all(state, tasks=[t])[t])
        print(f"| {name} | {pack_summary(folder)['total_bytes'] / 1e6:.2f} | {100 * sum(acc) / len(acc):.1f} |", flush=True)


if __name__ == "__main__":
    main()
