"""Time of bit allocation under a budget against plain quantization, in the same process.

Issue 15's goal: ``--budget-bits`` takes at most 2x the time of plain ``tvq quantize`` with the
same scheme. Both write a real pack of a benchmark run's checkpoints (``tvq bench build``):

    python benchmarks/budget_analysis.py --run ~/.cache/tvq/bench/runs/ci --budget-bits 1.2
    python benchmarks/budget_analysis.py --run VISION_RUN --budget-bits 3.0

Prints one table: seconds for each, the ratio, and the bytes each pack takes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tvq.encode.budget import quantize_within_budget
from tvq.encode.options import QuantizeOptions
from tvq.encode.pipeline import quantize
from tvq.execute import LocalExecutor

SCHEMES = {
    "tvq2": QuantizeOptions(bits=2),
    "rtvq-b3o2-ec (mse)": QuantizeOptions(residual=True, base_bits=3, bits=2, error_correction=True, quantizer="mse"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a benchmark run folder (tvq bench build)")
    parser.add_argument("--budget-bits", type=float, default=2.375)
    parser.add_argument("--threads", type=int, default=2, help="tensors at once, in both (tvq quantize --threads; its default)")
    args = parser.parse_args()
    manifest = json.loads((args.run / "manifest.json").read_text())
    pretrained = args.run / "pretrained"
    finetuned = {t: args.run / t for t in manifest["tasks"]}
    table = Table(title=f"bit allocation vs plain quantize: {args.run.name}, {len(finetuned)} tasks, budget {args.budget_bits} bits/param")
    for column in ("scheme", "quantize s", "budget s", "ratio", "quantize MB", "budget MB"):
        table.add_column(column, justify="right" if column != "scheme" else "left")
    with tempfile.TemporaryDirectory() as tmp:
        for label, options in SCHEMES.items():
            t0 = time.perf_counter()
            plain = quantize(pretrained, finetuned, Path(tmp) / "plain", options, progress=False, overwrite=True,
                             executor=LocalExecutor(args.threads))  # fmt: skip
            t1 = time.perf_counter()
            budget = quantize_within_budget(pretrained, finetuned, Path(tmp) / "budget", options, budget_bits=args.budget_bits,
                                            progress=False, overwrite=True, executor=LocalExecutor(args.threads))  # fmt: skip
            t2 = time.perf_counter()
            table.add_row(label, f"{t1 - t0:.1f}", f"{t2 - t1:.1f}", f"{(t2 - t1) / (t1 - t0):.2f}x",
                          f"{plain.bytes_written / 1e6:.2f}", f"{budget.bytes_written / 1e6:.2f}")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
