"""Tables and plots of a benchmark grid, in the paper's layout (methods x precisions).

Everything here is computed from ``results.json``; nothing is typed in by hand.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tvq.bench.matrix import METHODS, scheme_family
from tvq.io.atomic import atomic_file

FIXED, TUNED = "fixed", "tuned"


def _avg(acc: dict[str, float]) -> float:
    return 100 * sum(acc.values()) / len(acc)


def normalized(acc: dict[str, float], reference: dict[str, float]) -> float:
    """Mean over tasks of accuracy / the task's own fine-tuned FP32 accuracy, in %."""
    return 100 * sum(acc[t] / reference[t] for t in acc if reference.get(t)) / len(acc)


def wilson_halfwidth(p: float, n: int, z: float = 1.96) -> float:
    """Half the width of the Wilson 95 % interval of an accuracy ``p`` on ``n`` examples, in points."""
    if n <= 0:
        return float("nan")
    denom = 1 + z * z / n
    return 100 * z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom


def average_halfwidth(acc: Mapping[str, float], sizes: Mapping[str, int], z: float = 1.96) -> float:
    """Half-width (points) of a normal 95 % interval of the average over tasks of binomial accuracies."""
    variance = sum(acc[t] * (1 - acc[t]) / sizes[t] for t in acc if sizes.get(t))
    return 100 * z * math.sqrt(variance) / len(acc)


def interval_note(results: dict[str, Any]) -> str:
    """One sentence: how far sampling alone moves the numbers (from the fine-tuned models' accuracies)."""
    sizes = results.get("test_sizes")
    ref = results["cells"].get("individual|fp32|fixed")
    if not sizes or ref is None:
        return ""
    n, most = min(sizes.values()), max(sizes.values())
    return (f"Sampling error: {n if n == most else f'{n}–{most}'} test examples per task, so one example moves a task by up to "
            f"{100 / n:.1f} point; the 95 % binomial interval of an average here is about ±{average_halfwidth(ref['acc'], sizes):.1f} "
            "point (per-task intervals in the per-task table).")  # fmt: skip


def cell(results: dict[str, Any], method: str, precision: str, mode: str = FIXED) -> dict | None:
    return results["cells"].get(f"{method}|{precision}|{mode}")


def method_rows(results: dict[str, Any]) -> list[str]:
    seen = []
    for c in results["cells"].values():
        if c["method"] not in ("zero_shot", "individual") and c["method"] not in seen:
            seen.append(c["method"])
    return seen


def precision_columns(results: dict[str, Any]) -> list[str]:
    seen = []
    for c in results["cells"].values():
        if c["method"] != "zero_shot" and c["precision"] not in seen:
            seen.append(c["precision"])
    return seen


def markdown_table(results: dict[str, Any], mode: str = FIXED, norm: bool = False) -> str:
    """Average accuracy (or normalized accuracy) per method x precision, as Markdown."""
    ref = results["cells"]["individual|fp32|fixed"]["acc"]
    cols = precision_columns(results)
    labels = [results["precisions"].get(p, {}).get("label", p) for p in cols]
    bits = [results["precisions"].get(p, {}).get("bits_per_param") for p in cols]
    out = ["| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(cols)]
    trained = [results["precisions"].get(p, {}).get("bits_per_trained_param") for p in cols]
    out.append("| bits/param/task (on disk) | " + " | ".join(f"{b:.2f}" if b else "–" for b in bits) + " |")
    out.append("| bits/trained param/task | " + " | ".join(f"{b:.2f}" if b else "–" for b in trained) + " |")
    zs = results["cells"].get("zero_shot")
    if zs:
        out.append(f"| Zero-shot | {_fmt(zs['acc'], ref, norm)} |" + " |" * (len(cols) - 1))
    rows = [("individual", "Individual")] + [(m, METHODS[m].label if m in METHODS else m) for m in method_rows(results)]
    for method, label in rows:
        values = []
        for p in cols:
            c = cell(results, method, p, mode) or (cell(results, method, p, FIXED) if method == "individual" else None)
            values.append(_fmt(c["acc"], ref, norm) if c else "–")
        out.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(out)


def _fmt(acc: dict[str, float], ref: dict[str, float], norm: bool) -> str:
    return f"{normalized(acc, ref):.1f}" if norm else f"{_avg(acc):.1f}"


def per_task_table(results: dict[str, Any], precision: str = "fp32", mode: str = FIXED) -> str:
    """Per-task accuracy (%), with the Wilson 95 % half-width when the test sizes are known."""
    tasks = results["tasks"]
    sizes = results.get("test_sizes") or {}
    out = ["| method | " + " | ".join(tasks) + " | avg |", "|---|" + "---|" * (len(tasks) + 1)]
    for key, c in results["cells"].items():
        if c["precision"] == precision and c["mode"] == mode or key == "zero_shot":
            values = [f"{100 * c['acc'][t]:.1f}" + (f" ±{wilson_halfwidth(c['acc'][t], sizes[t]):.1f}" if t in sizes else "") for t in tasks]
            avg = f"{_avg(c['acc']):.1f}" + (f" ±{average_halfwidth(c['acc'], sizes):.1f}" if sizes else "")
            out.append(f"| {c['method']} | " + " | ".join(values) + f" | {avg} |")
    return "\n".join(out)


def frontier_table(results: dict[str, Any], mode: str = FIXED) -> str:
    """Every storage scheme by size: bits, bytes, and each method's average and change vs FP32.

    The goal of issue 15 is checked per row, in bits per *trained* parameter per task (what a
    pack of the changed tensors costs): at <= 1.5 every method within 0.5 point of its FP32
    average, at <= 1.0 within 1.5 points.
    """
    methods = ["individual", *method_rows(results)]
    fp32 = {m: cell(results, m, "fp32", mode) or cell(results, m, "fp32", FIXED) for m in methods}
    rows = sorted(((p, info) for p, info in results["precisions"].items() if p != "fp32"), key=lambda kv: kv[1]["bytes_per_task"])
    names = ["Individual" if m == "individual" else METHODS[m].label if m in METHODS else m for m in methods]
    out = ["| scheme | bits/param | bits/trained param | MB/task | " + " | ".join(names) + " | goal |",
           "|---|---|---|---|" + "---|" * (len(methods) + 1)]  # fmt: skip
    for p, info in rows:
        values, worst = [], None
        for m in methods:
            c = cell(results, m, p, mode) or (cell(results, m, p, FIXED) if m == "individual" else None)
            reference = fp32[m]
            if c is None or reference is None:
                values.append("–")
                continue
            delta = _avg(c["acc"]) - _avg(reference["acc"])
            worst = delta if worst is None else min(worst, delta)
            values.append(f"{_avg(c['acc']):.1f} ({delta:+.1f})")
        bits = info["bits_per_param"]
        trained = info.get("bits_per_trained_param")
        if trained is None and results.get("trained_params"):
            trained = info["bytes_per_task"] * 8 / results["trained_params"]
        per_trained = trained if trained is not None else bits
        limit = 1.5 if per_trained <= 1.0 else 0.5 if per_trained <= 1.5 else None
        goal = "–" if limit is None or worst is None else ("met" if worst >= -limit else f"missed (worst {worst:+.1f})")
        out.append(f"| {info['label']} | {bits:.2f} | {trained:.2f} | {info['bytes_per_task'] / 1e6:.2f} | " if trained is not None
                   else f"| {info['label']} | {bits:.2f} | – | {info['bytes_per_task'] / 1e6:.2f} | ")  # fmt: skip
        out[-1] += " | ".join(values) + f" | {goal} |"
    return "\n".join(out)


MARKERS = {"FP32": "*", "FQ": "X", "TVQ": "o", "RTVQ": "s", "RTVQ+EC": "D", "budget": "^", "budget, Fisher": "v", "budget per trained parameter": "<"}


def _method_label(method: str) -> str:
    return "Individual" if method == "individual" else METHODS[method].label if method in METHODS else method


def plots(results: dict[str, Any], out: Path, methods: Sequence[str] | None = None) -> list[Path]:
    """accuracy_vs_bits.png (the paper's schemes) and accuracy_vs_bytes.png (every scheme).

    Colour is the method, marker the scheme family; lines join only the widths of one family
    (TVQ 8…2 bits, RTVQ base widths, budgets), never unrelated schemes. Every scheme is named
    at the top of the plot over a dotted line at its size, FQ included; the dashed line is
    zero-shot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    written = []
    precisions = results["precisions"]
    methods = list(methods or ["individual", *method_rows(results)])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    zero_shot = results["cells"].get("zero_shot")
    for name, xkey, paper_only, xlabel in [
        ("accuracy_vs_bits.png", "bits_per_param", True, "bits per parameter per task (measured on disk)"),
        ("accuracy_vs_bytes.png", "bytes_per_task", False, "bytes on disk per task"),
    ]:
        shown = {p: info for p, info in precisions.items() if not (paper_only and not info.get("paper", True))}
        fig, ax = plt.subplots(figsize=(9, 6))
        families: list[str] = []
        for i, method in enumerate(methods):
            by_family: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for p, info in shown.items():
                c = cell(results, method, p, FIXED)
                if c:
                    family = info.get("family") or scheme_family(p)
                    by_family[family].append((info[xkey], _avg(c["acc"])))
            for family, pts in by_family.items():
                pts.sort()
                families += [family] if family not in families else []
                joined = family in MARKERS and family != "FP32" and len(pts) > 1
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker=MARKERS.get(family, "P"), color=colors[i % len(colors)],
                        linestyle="-" if joined else "none", markersize=6, linewidth=1.2)  # fmt: skip
        at: dict[float, list[str]] = defaultdict(list)
        for p, info in shown.items():
            if any(cell(results, m, p, FIXED) for m in methods):
                at[round(math.log2(info[xkey]), 2)].append(info.get("label", p))
        for x2, labels in at.items():
            ax.axvline(2**x2, color="0.85", linestyle=":", linewidth=0.8, zorder=0)
            ax.text(2**x2, 1.01, " / ".join(labels), transform=ax.get_xaxis_transform(), rotation=60, fontsize=6, ha="left", va="bottom")
        if zero_shot:
            ax.axhline(_avg(zero_shot["acc"]), color="0.4", linestyle="--", linewidth=1)
        handles = [Line2D([], [], color=colors[i % len(colors)], label=_method_label(m)) for i, m in enumerate(methods)]
        handles += [Line2D([], [], color="0.3", marker=MARKERS.get(f, "P"), linestyle="none", label=f) for f in families]
        if zero_shot:
            handles.append(Line2D([], [], color="0.4", linestyle="--", label=f"zero-shot ({_avg(zero_shot['acc']):.1f})"))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("average test accuracy over tasks (%), λ fixed")
        title = "TVQ / RTVQ as in the paper" if paper_only else "every storage scheme"
        fig.suptitle(f"tvq {results.get('suite', 'text')} benchmark ({len(results['tasks'])} tasks): {title}", y=0.98)
        ax.grid(True, alpha=0.3)
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout(rect=(0, 0, 1, 0.96))
        path = out / name
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(results: dict[str, Any], out: Path) -> Path:
    """results.md: the grid at fixed and tuned λ, normalized accuracy, and per-task numbers."""
    parts = [
        "# tvq benchmark results",
        f"Run: `{results['run']}`; tasks: {', '.join(results['tasks'])}.",
        "Average test accuracy (%) over tasks; λ at the paper's fixed value.",
        markdown_table(results, FIXED),
        "Normalized accuracy (%): each task's accuracy / its own fine-tuned FP32 model's, averaged.",
        markdown_table(results, FIXED, norm=True),
    ]
    if any(c["mode"] == TUNED for c in results["cells"].values()):
        parts += ["Average test accuracy (%) with λ tuned on the validation split.", markdown_table(results, TUNED)]
    parts += [
        "Every storage scheme by size (the frontier): average accuracy and, in brackets, the change from the "
        "same method with FP32 task vectors. Goal (issue 15), in bits per trained parameter per task: within "
        "0.5 point at <= 1.5, within 1.5 points at <= 1.0.",
        frontier_table(results),
        "Per task, FP32 task vectors (± the Wilson 95 % half-width of each accuracy, in points):",
        per_task_table(results),
        interval_note(results),
    ]
    path = out / "results.md"
    with atomic_file(path) as tmp:
        tmp.write_text("\n\n".join(parts) + "\n")
    return path
