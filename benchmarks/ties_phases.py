"""Where global TIES's pre-pass spends its time: the code histograms (cut-offs), the exact
rule's tie cut and the majority-sign pass, timed one by one on a real pack (issue 19).

Wraps ``TiesStats``'s three steps with timers and runs ``TiesStats.compute`` as ``tvq merge
--method ties`` does (density 0.2, exact rule); ``--tie-rule keep_ties`` skips the tie cut.
Prints one line per step (wall and CPU seconds) and the cut-offs found, so two versions of tvq
can be compared on the same pack (``PYTHONPATH=<other checkout>/src``)::

    python benchmarks/ties_phases.py --pretrained /work/bench_llm/models/base --pack /work/bench_llm/packs/tvq4
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import tvq.merge.methods.ties as ties_module
from tvq.merge import load_task_vectors
from tvq.merge.source import TaskSource


def timed(owner: Any, name: str, label: str, rows: list[tuple[str, float, float]]) -> None:
    """Replace ``owner.name`` by a version that records its wall and CPU time under ``label``."""
    real: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            rows.append((label, time.perf_counter() - wall, time.process_time() - cpu))

    setattr(owner, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True)
    p.add_argument("--pack", required=True)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--tie-rule", default="exact", choices=["exact", "keep_ties"])
    args = p.parse_args()
    rows: list[tuple[str, float, float]] = []
    timed(ties_module, "model_counts", "code histograms (cut-offs)", rows)
    timed(ties_module.TiesStats, "_break_ties", "tie cut (exact rule)", rows)
    timed(ties_module.TiesStats, "_vote", "majority sign and kept counts", rows)
    pre, vectors = load_task_vectors(args.pretrained, packs=[args.pack])
    wall, cpu = time.perf_counter(), time.process_time()
    stats = ties_module.TiesStats.compute(TaskSource(pre, vectors), args.density, tie_rule=args.tie_rule)
    rows.append(("pre-pass in all", time.perf_counter() - wall, time.process_time() - cpu))
    print("| step | wall s | CPU s |\n|---|---:|---:|")
    for label, w, c in rows:
        print(f"| {label} | {w:.1f} | {c:.1f} |")
    print("cut-offs:", [f"{float(x):.6g}" for x in stats.thresholds], "hash cuts:", stats.hash_cut, "tensors:", stats.cut_key)


if __name__ == "__main__":
    main()
