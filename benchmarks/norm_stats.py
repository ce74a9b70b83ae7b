"""Which running statistics should a merged BatchNorm model use? (issue 14, docs/merging.md)

Merges the same task vectors with each statistics choice and evaluates every task:

* ``old``: the statistics merged as weights by the method (tvq before issue 14: ``statistics=[]``),
* ``pretrained``, ``mean``: one merged model (``--norm-stats pretrained|mean``),
* ``own``: task t evaluated on the model written with ``--norm-stats task:t`` (one file per task),
* ``pooled``: re-estimated once on unlabeled images of all tasks (``reestimate_norm_stats``),
* ``reest-task``: re-estimated for each task on its own unlabeled images (one model per task).

Two models: ``toy`` (the tiny CNN of tests/merge/bn_toy.py, 3 synthetic tasks, seconds) and
``vision RUN`` (a built vision run: EfficientNet-Lite0, ``tvq bench build --suite vision``)::

    python benchmarks/norm_stats.py toy
    python benchmarks/norm_stats.py vision ~/.cache/tvq/bench/runs/vision-ci [--precision tvq4]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from tvq.merge import merge_state_dict
from tvq.merge.statistics import NormStatsWarning
from tvq.normstats import reestimate_norm_stats
from tvq.vector import TaskVector

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "task_arithmetic": {},
    "ties": {},
    "average": {},
    "magmax": {},
}
CHOICES = ["old", "pretrained", "mean", "own", "pooled", "reest-task"]


def measure(
    pre: object,
    tvs: dict[str, TaskVector],
    tasks: list[str],
    evaluate: Callable[[dict[str, torch.Tensor], str], float],
    reestimate: Callable[[dict[str, torch.Tensor], list[str], str], float],
    methods: dict[str, dict],
) -> dict[str, dict[str, dict[str, float]]]:
    """method -> choice -> task -> accuracy."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, options in methods.items():
        rows: dict[str, dict[str, float]] = {}
        merged = merge_state_dict(method, pre, tvs, options)  # whatever default: re-estimated below
        old = merge_state_dict(method, pre, tvs, options, statistics=[])
        rows["old"] = {t: evaluate(old, t) for t in tasks}
        for choice in ("pretrained", "mean"):
            state = merge_state_dict(method, pre, tvs, options, norm_stats=choice)
            rows[choice] = {t: evaluate(state, t) for t in tasks}
        rows["own"] = {t: evaluate(merge_state_dict(method, pre, tvs, options, norm_stats=f"task:{t}"), t) for t in tasks}
        rows["pooled"] = {t: reestimate(merged, tasks, t) for t in tasks}
        rows["reest-task"] = {t: reestimate(merged, [t], t) for t in tasks}
        out[method] = rows
    return out


def table(results: dict[str, dict[str, dict[str, float]]], tasks: list[str], refs: dict[str, dict[str, float]]) -> str:
    head = "| method | statistics | " + " | ".join(tasks) + " | mean |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for name, row in refs.items():
        lines.append(f"| {name} | | " + " | ".join(f"{100 * row[t]:.1f}" for t in tasks) + f" | {100 * sum(row.values()) / len(row):.1f} |")
    for method, rows in results.items():
        for choice in CHOICES:
            row = rows[choice]
            best = max(sum(r.values()) for c, r in rows.items() if c in ("old", "pretrained", "mean"))
            mark = "**" if choice in ("pretrained", "mean", "old") and sum(row.values()) == best else ""
            cells = " | ".join(f"{100 * row[t]:.1f}" for t in tasks)
            lines.append(f"| {method} | {choice} | {cells} | {mark}{100 * sum(row.values()) / len(row):.1f}{mark} |")
    return "\n".join(lines)


def run_toy(methods: dict[str, dict]) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "merge"))
    from bn_toy import TASKS, build, load  # the suite's BN test model

    torch.set_num_threads(1)
    toy = build()
    tasks = list(TASKS)
    tvs = {t: TaskVector.from_checkpoints(toy.pre, toy.fts[t], name=t) for t in tasks}

    def reestimate(state: dict, on: list[str], task: str) -> float:
        model = load(state)
        reestimate_norm_stats(model, [toy.unlabeled[t] for t in on])
        return toy.accuracy(model, task)

    def zero_shot(task: str) -> float:
        return reestimate(toy.pre, [task], task)

    refs = {
        "zero-shot (pretrained stats)": {t: toy.accuracy(toy.pre, t) for t in tasks},
        "zero-shot (re-estimated per task)": {t: zero_shot(t) for t in tasks},
        "individual": {t: toy.accuracy(toy.fts[t], t) for t in tasks},
    }
    results = measure(toy.pre, tvs, tasks, lambda s, t: toy.accuracy(s, t), reestimate, methods)
    print(table(results, tasks, refs))


def run_vision(folder: Path, methods: dict[str, dict], precision: str, bn_images: int | None) -> None:
    from tvq.bench.vision.run import VisionRun, reestimate_on

    run = VisionRun(folder, bn_stats="merged")  # evaluate the statistics the tensors hold
    tasks = list(run.tasks)
    pre = run.pretrained_path
    if precision == "fp32":
        tvs = {t: TaskVector.from_checkpoints(pre, run.finetuned_path(t), name=t) for t in tasks}
    else:
        from tvq.bench.matrix import Matrix

        tvs = Matrix(run, folder / "grid-normstats", progress=False).task_vectors(precision)
    n_images = bn_images or run.config.bn_images

    def evaluate(state: dict, task: str) -> float:
        return run.evaluate_all(state, tasks=[task])[task]

    def reestimate(state: dict, on: list[str], task: str) -> float:
        from tvq.bench.vision.run import accuracy

        model = run.load_model(state)
        reestimate_on(model, run.encoder, [run.task(t).images("train") for t in on], n_images, run.config.seed)
        return accuracy(model, run.task(task))

    refs = {
        "zero-shot (pretrained stats)": {t: evaluate(dict(run.load_model().state_dict()), t) for t in tasks},
        "zero-shot (re-estimated per task)": {t: reestimate(dict(run.load_model().state_dict()), [t], t) for t in tasks},
        "individual (own stats)": {t: run.evaluate_all(run.finetuned_path(t), tasks=[t])[t] for t in tasks},
    }
    results = measure(pre, tvs, tasks, evaluate, reestimate, methods)
    print(table(results, tasks, refs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["toy", "vision"])
    parser.add_argument("run", nargs="?", type=Path, help="vision: a built vision run folder")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--precision", default="fp32", help="vision: fp32 or a grid precision (tvq4, tvq2, rtvq-b3o2-ec, ...)")
    parser.add_argument("--bn-images", type=int, default=None, help="vision: images for re-estimation (default: the run's)")
    args = parser.parse_args()
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    warnings.simplefilter("ignore", NormStatsWarning)
    start = time.time()
    if args.model == "toy":
        run_toy(methods)
    else:
        if args.run is None:
            parser.error("vision needs a run folder")
        run_vision(args.run, methods, args.precision, args.bn_images)
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
