"""What the histogram sample of the task vectors and offsets changes in RTVQ's bit allocation analysis.

``tvq.encode.budget.RTVQ_SAMPLE`` bins at most 1 Mi values per task vector and offset (ranges stay exact). This
analyses one checkpoint family twice, with the whole ``SAMPLE`` (4 Mi) and with ``RTVQ_SAMPLE``,
and prints the time of each, the largest relative change of any tensor's option (error, bytes) and
of the per-scheme sums, and whether the anchored and the free plans agree at several budgets:

    python benchmarks/rtvq_sample.py --models /work/bench_llm/models   # base/, ft0/ … (make_models.py)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tvq.encode.budget as budget
from tvq.encode.options import QuantizeOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="a folder with base/ and ft0/, ft1/, … (benchmarks/llm/make_models.py)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    finetuned = {p.name: p for p in sorted(args.models.glob("ft*"))}
    T = len(finetuned)
    options = QuantizeOptions(residual=True, base_bits=3, bits=2, error_correction=True).validated()
    tables = {}
    chosen = budget.RTVQ_SAMPLE
    for sample in (budget.SAMPLE, chosen):
        budget.RTVQ_SAMPLE = sample
        start = time.perf_counter()
        tables[sample] = budget.analyse(args.models / "base", finetuned, options, progress=False, threads=args.threads, cross=True)
        print(f"RTVQ sample {sample:>8,}: analysis {time.perf_counter() - start:.1f} s")
    budget.RTVQ_SAMPLE = chosen
    whole, sampled = tables[budget.SAMPLE][0], tables[chosen][0]
    worst_error = worst_bytes = 0.0
    sums: dict[tuple[int, int | None, str | None], list[float]] = {}
    for key, options_whole in whole.items():
        for a, b in zip(options_whole, sampled[key], strict=True):
            if a.error > 0:
                worst_error = max(worst_error, abs(b.error / a.error - 1))
            worst_bytes = max(worst_bytes, abs(b.nbytes / a.nbytes - 1))
            row = sums.setdefault((a.bits, a.base_bits, a.scheme), [0.0, 0.0, 0.0, 0.0])
            row[0] += a.error
            row[1] += b.error
            row[2] += a.nbytes
            row[3] += b.nbytes
    print(f"per tensor option: largest relative change of the error {worst_error:.4%}, of the bytes {worst_bytes:.4%}")
    print(f"per scheme (summed over tensors): error {max(abs(r[1] / r[0] - 1) for r in sums.values() if r[0] > 0):.4%}, "
          f"bytes {max(abs(r[3] / r[2] - 1) for r in sums.values()):.4%}")  # fmt: skip
    for bits in (1.0, 1.5, 2.375, 3.0):
        anchored = []
        free = []
        for table in tables.values():
            ladder = budget.anchor_ladder(table, T, options, bits, None)
            anchored.append(budget.plan_from(table, T, bits, None, 0, ladder[0] if ladder else None))
            free.append(budget.plan_from((budget.requested_family(table[0], options), table[1], table[2]), T, bits, None))
        differ = [sum(p[0].bits[k] != p[1].bits[k] or p[0].base_bits.get(k) != p[1].base_bits.get(k) or p[0].schemes.get(k) != p[1].schemes.get(k)
                      for k in p[0].bits) for p in (anchored, free)]  # fmt: skip
        print(f"--budget-bits {bits}: anchored plans differ in {differ[0]} tensors, free plans in {differ[1]} of {len(whole)}")


if __name__ == "__main__":
    main()
