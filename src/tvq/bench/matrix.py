"""The benchmark grid: every merging method x every precision, evaluated per task.

Precisions are made with tvq itself (packs under ``<out>/packs``); every merge reads its
task vectors from those packs, exactly as a user would. Each cell is evaluated on the test
split with λ at the paper's fixed value and, where the method has a λ, with λ tuned on the
validation split. Results are cached cell by cell in ``results.json``, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tvq.bench import BenchError
from tvq.bench.evaluate import BenchRun, open_run, read_state_dict
from tvq.bench.fisher import diagonal_fisher, write_sensitivity
from tvq.encode.budget import quantize_within_budget
from tvq.encode.options import QuantizeOptions
from tvq.encode.pipeline import quantize
from tvq.io.atomic import atomic_file
from tvq.io.readers import open_checkpoint
from tvq.merge import merge_state_dict
from tvq.merge.adamerging import adamerging
from tvq.pack.reader import open_pack
from tvq.report import pack_summary
from tvq.vector import TaskVector

RESULTS = "results.json"


@dataclass(frozen=True)
class Precision:
    """How task vectors are stored: FP32 (the checkpoints themselves) or a pack recipe."""

    name: str
    label: str
    options: dict[str, Any] | None = None  # QuantizeOptions fields; None = FP32 checkpoints
    budget_bits: float | None = None
    paper: bool = True  # in the paper's tables (False: tvq's improvements)
    fisher: bool = False  # allocate with the diagonal Fisher as sensitivity (else the weights alone)
    budget_like: str | None = None  # allocate within the measured size of this precision's pack
    budget_trained_bits: float | None = None  # a budget in bits per *trained* parameter per task (frozen tensors cost nothing)
    allocation: str = "anchored"  # tvq.encode.budget: on the largest fixed scheme that fits, or "free"

    @property
    def budgeted(self) -> bool:
        """Whether the pack is allocated under a budget (bits per parameter, per trained parameter, or another pack's size)."""
        return self.budget_bits is not None or self.budget_like is not None or self.budget_trained_bits is not None

    @property
    def family(self) -> str:
        """The scheme family a plot joins with lines (widths of one scheme), see ``scheme_family``."""
        return scheme_family(self.name)


def scheme_family(precision: str) -> str:
    """``TVQ`` for tvq8…tvq2, ``FQ``, ``RTVQ`` / ``RTVQ+EC`` over base widths, ``budget`` /
    ``budget, Fisher`` over budgets, ``FP32``; any other scheme is its own family (not joined)."""
    if precision == "fp32":
        return "FP32"
    if re.fullmatch(r"fq\d+", precision):
        return "FQ"
    if re.fullmatch(r"tvq\d+", precision):
        return "TVQ"
    if re.fullmatch(r"rtvq-b\d+o\d+(-ec)?", precision):
        return "RTVQ+EC" if precision.endswith("-ec") else "RTVQ"
    if re.fullmatch(r"budget-trained-[\d.]+(-free)?", precision):
        return "budget per trained parameter"
    if re.fullmatch(r"budget-[\d.]+(-fisher)?", precision):
        return "budget, Fisher" if precision.endswith("-fisher") else "budget"
    return precision


def _p(name: str, label: str, paper: bool = True, budget: float | None = None, fisher: bool = False, **options: Any) -> Precision:
    return Precision(name, label, options or None, budget, paper, fisher)


_RTVQ_EC_MSE: dict[str, Any] = dict(residual=True, base_bits=3, bits=2, error_correction=True, quantizer="mse")


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in [
        _p("fp32", "FP32"),
        _p("fq8", "FQ INT8", target="finetuned", bits=8),
        _p("fq4", "FQ INT4", target="finetuned", bits=4),
        _p("tvq8", "TVQ INT8", bits=8),
        _p("tvq4", "TVQ INT4", bits=4),
        _p("tvq3", "TVQ INT3", bits=3),
        _p("tvq2", "TVQ INT2", bits=2),
        _p("rtvq-b3o2", "RTVQ B3O2", residual=True, base_bits=3, bits=2),
        _p("rtvq-b3o2-ec", "RTVQ B3O2+EC", residual=True, base_bits=3, bits=2, error_correction=True),
        _p("rtvq-b4o2-ec", "RTVQ B4O2+EC", residual=True, base_bits=4, bits=2, error_correction=True),
        _p("rtvq-b2o2-ec", "RTVQ B2O2+EC", residual=True, base_bits=2, bits=2, error_correction=True),
        # beyond the paper (issue 5): better grids, and bits allocated under a byte budget
        _p("tvq2-mse", "TVQ INT2 mse-clip", False, bits=2, quantizer="mse"),
        _p("tvq2-group128", "TVQ INT2 group128", False, bits=2, quantizer="group", group_size=128),
        _p("tvq-ternary", "TVQ ternary", False, bits=2, quantizer="ternary"),
        _p("tvq-sign", "TVQ 1-bit sign", False, bits=1, quantizer="sign"),
        _p("rtvq-mse-b3o2-ec", "RTVQ B3O2+EC mse-clip", False, residual=True, base_bits=3, bits=2, error_correction=True, quantizer="mse"),
        _p("budget-3.0", "budget 3.0 b (RTVQ+EC, mse)", False, 3.0, **_RTVQ_EC_MSE),  # TVQ INT2's size where 1-D tensors stay exact
        _p("budget-2.375", "budget 2.375 b (RTVQ+EC, mse)", False, 2.375, **_RTVQ_EC_MSE),
        _p("budget-1.6", "budget 1.6 b (RTVQ+EC, mse)", False, 1.6, **_RTVQ_EC_MSE),
        _p("budget-1.2", "budget 1.2 b (RTVQ+EC, mse)", False, 1.2, **_RTVQ_EC_MSE),
        _p("budget-0.8", "budget 0.8 b (RTVQ+EC, mse)", False, 0.8, **_RTVQ_EC_MSE),
        _p("budget-1.2-fisher", "budget 1.2 b, Fisher (RTVQ+EC, mse)", False, 1.2, True, **_RTVQ_EC_MSE),
        # a budget as large as a fixed scheme's pack: the anchored allocation is that very scheme (issue 15)
        Precision("budget-as-tvq2", "budget = TVQ INT2's size (TVQ INT2 + upgrades)", {"bits": 2, "quantizer": "mse"}, paper=False,
                  budget_like="tvq2"),
        Precision("budget-as-tvq3", "budget = TVQ INT3's size (TVQ INT3 + upgrades)", {"bits": 3, "quantizer": "mse"}, paper=False,
                  budget_like="tvq3"),
        _p("budget-0.8-fisher", "budget 0.8 b, Fisher (RTVQ+EC, mse)", False, 0.8, True, **_RTVQ_EC_MSE),
        # issue 15's frontier goals are in bits per trained parameter: budgets in that unit, the default TVQ request
        *(Precision(f"budget-trained-{b}", f"budget {b} b/trained param (TVQ)", {"bits": 2}, paper=False, budget_trained_bits=b)
          for b in (1.0, 1.25, 1.5)),
        # the same budgets chosen freely by the error over min–max and MSE-clipped TVQ grids of every width, priced entropy-coded
        *(Precision(f"budget-trained-{b}-free", f"budget {b} b/trained param (TVQ, free, mse)", {"bits": 2, "quantizer": "mse"},
                    paper=False, budget_trained_bits=b, allocation="free") for b in (1.0, 1.5)),
    ]
}

LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
SVD_LAMBDA_GRID = (0.4, 0.7, 1.0, 1.3, 1.6, 2.0, 3.0)
DELLA_LAMBDA_GRID = (0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 1.5)


@dataclass(frozen=True)
class MethodSpec:
    """A merging method with the paper's fixed options; ``tune`` names the λ to tune."""

    name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    tune: str | None = "lambda"
    per_task: bool = False
    grid: tuple[float, ...] = LAMBDA_GRID  # the values ``tune`` is tried at
    method: str | None = None  # the registry's method, when ``name`` is a variant of it

    @property
    def registry_name(self) -> str:
        return self.method or self.name


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec("average", "Weight averaging", tune=None),
        MethodSpec("task_arithmetic", "Task arithmetic", {"lambda": 0.3}),
        MethodSpec("ties", "TIES-Merging", {"density": 0.2, "lambda": 0.3}),
        MethodSpec("dare", "DARE + TA", {"drop_rate": 0.9, "lambda": 0.3}),
        MethodSpec("breadcrumbs", "Breadcrumbs", {"density": 0.1, "gamma": 0.01, "lambda": 0.3}),
        MethodSpec("magmax", "MagMax", {"lambda": 0.5}),
        MethodSpec("lines", "LiNeS", {"beta": 0.5}, tune="beta"),
        MethodSpec("consensus", "Consensus TA", {"k": 2, "mask_lambda": 0.4, "lambda": 0.3}),
        MethodSpec("emr", "EMR-Merging", tune=None, per_task=True),
        MethodSpec("adamerging", "AdaMerging", tune=None),
        # issue 14: the SVD methods' references tune α over (0, 3], DELLA's mean-based fuse near 1
        MethodSpec("tsv_merge", "TSV-Merge", {"lambda": 1.0}, grid=SVD_LAMBDA_GRID),
        MethodSpec("iso_c", "Iso-C", {"lambda": 1.0}, grid=SVD_LAMBDA_GRID),
        MethodSpec("iso_cts", "Iso-CTS", {"lambda": 1.0, "common_space_fraction": 0.8}, grid=SVD_LAMBDA_GRID),
        # the SVD methods on conv kernels as (out, in·k·k) matrices (their references average them)
        MethodSpec("tsv_merge-kernels", "TSV-Merge, kernels decomposed", {"lambda": 1.0, "kernels": "flatten"}, grid=SVD_LAMBDA_GRID,
                   method="tsv_merge"),
        MethodSpec("iso_c-kernels", "Iso-C, kernels decomposed", {"lambda": 1.0, "kernels": "flatten"}, grid=SVD_LAMBDA_GRID, method="iso_c"),
        MethodSpec("iso_cts-kernels", "Iso-CTS, kernels decomposed", {"lambda": 1.0, "common_space_fraction": 0.8, "kernels": "flatten"},
                   grid=SVD_LAMBDA_GRID, method="iso_cts"),
        MethodSpec("model_stock", "Model Stock", tune=None),
        MethodSpec("della", "DELLA", {"density": 0.7, "epsilon": 0.07, "lambda": 1.1}, grid=DELLA_LAMBDA_GRID),
        MethodSpec("della_linear", "DELLA (linear)", {"density": 0.7, "epsilon": 0.07, "lambda": 0.3}),
        MethodSpec("breadcrumbs_ties", "Breadcrumbs-TIES", {"density": 0.1, "gamma": 0.01, "lambda": 0.3}),
    ]
}


EDGE_STEPS = 4  # grid values tried past an edge that keeps winning


def edge_values(grid: Sequence[float], upward: bool) -> list[float]:
    """The values past the grid's top edge (by its last step) or bottom edge (halving; λ stays > 0)."""
    if upward:
        step = grid[-1] - grid[-2] if len(grid) > 1 else grid[-1]
        return [round(grid[-1] + step * (i + 1), 6) for i in range(EDGE_STEPS)]
    return [round(grid[0] / 2 ** (i + 1), 6) for i in range(EDGE_STEPS)]


def tune_value(grid: Sequence[float], score: Callable[[float], float]) -> float:
    """The best of ``grid`` by ``score`` (the first of equals), extended past an edge while the
    edge value is the best so far and each further step improves on it."""
    if not grid:
        raise ValueError("λ grids are never empty")
    scores = {value: score(value) for value in grid}
    best = max(grid, key=lambda v: scores[v])  # max keeps the first of equal scores
    if len(grid) > 1 and best in (grid[0], grid[-1]):
        for value in edge_values(grid, upward=best == grid[-1]):
            s = score(value)
            if s <= scores[best]:
                break
            scores[value], best = s, value
    return best


@dataclass
class Cell:
    method: str
    precision: str
    mode: str  # "fixed" or "tuned"
    acc: dict[str, float]
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def avg(self) -> float:
        return sum(self.acc.values()) / len(self.acc)


class Matrix:
    """One benchmark run's grid, its packs and its cached results."""

    def __init__(self, run: str | Path | BenchRun, out: str | Path, *, progress: bool = True) -> None:
        self.run = run if isinstance(run, BenchRun) else open_run(run)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        # evaluation settings that change every cell (the vision suite's BatchNorm rule); {} for text
        settings = {"bn_stats": self.run.config.bn_stats} if hasattr(self.run.config, "bn_stats") else {}
        self.results: dict[str, Any] = {"run": str(self.run.out), "suite": self.run.suite, "tasks": self.run.tasks, "cells": {}, "precisions": {}}
        if settings:
            self.results["settings"] = settings
        if (self.out / RESULTS).is_file():
            cached = json.loads((self.out / RESULTS).read_text())
            if cached.get("run") == str(self.run.out) and cached.get("tasks") == self.run.tasks and cached.get("settings", {}) == settings:
                self.results = cached
        # test examples per task: the binomial intervals of the reports
        infos = self.run.manifest["task_info"]
        self.results["test_sizes"] = {t: infos[t]["splits"]["sizes"]["test"] for t in self.run.tasks}

    # -- bookkeeping ----------------------------------------------------------------------
    def save(self) -> None:
        with atomic_file(self.out / RESULTS) as tmp:
            tmp.write_text(json.dumps(self.results, indent=1))

    def _cached(self, key: str, compute: Callable[[], Cell]) -> Cell:
        if key in self.results["cells"]:
            return Cell(**self.results["cells"][key])
        cell = compute()
        self.results["cells"][key] = asdict(cell)
        self.save()
        return cell

    # -- task vectors per precision ---------------------------------------------------------
    def task_vectors(self, precision: str) -> dict[str, TaskVector]:
        spec = PRECISIONS[precision]
        if spec.options is None:
            pre = self.run.pretrained_path
            return {t: TaskVector.from_checkpoints(pre, self.run.finetuned_path(t), name=t) for t in self.run.tasks}
        pack = open_pack(self.pack(precision), self.run.pretrained_path)
        return pack.task_vectors()

    def pack(self, precision: str) -> Path:
        """Build (once) the pack of this precision from the run's checkpoints."""
        spec = PRECISIONS[precision]
        path = self.out / "packs" / precision
        if not (path / "manifest.json").is_file():
            finetuned = {t: self.run.finetuned_path(t) for t in self.run.tasks}
            options = QuantizeOptions(**(spec.options or {}))
            if spec.budgeted:
                sensitivity = self.fisher() if spec.fisher else None
                budget_bytes = self._budget_bytes(spec)
                quantize_within_budget(self.run.pretrained_path, finetuned, path, options, budget_bits=spec.budget_bits,
                                       budget_bytes=budget_bytes, sensitivity=sensitivity, allocation=spec.allocation, progress=False,
                                       overwrite=True)  # fmt: skip
            else:
                quantize(self.run.pretrained_path, finetuned, path, options, progress=False, overwrite=True)
        if precision not in self.results["precisions"]:
            s = pack_summary(path)
            trained = self._trained_params()
            self.results["precisions"][precision] = {
                "label": spec.label,
                "bytes_per_task": s["total_bytes"] / len(s["tasks"]),
                "bits_per_param": s["bits_per_param"],
                "bits_per_trained_param": s["total_bytes"] * 8 / len(s["tasks"]) / trained,
                "rel_error": sum(t["rel_error"] for t in s["tasks"]) / len(s["tasks"]),
                "paper": spec.paper,
                "family": spec.family,
            }
            self.save()
        return path

    def _budget_bytes(self, spec: Precision) -> int | None:
        """A budget given as bytes: another pack's measured size, or bits per trained parameter per task."""
        if spec.budget_like is not None:
            return int(pack_summary(self.pack(spec.budget_like))["total_bytes"])
        if spec.budget_trained_bits is not None:
            return int(spec.budget_trained_bits * self._trained_params() * len(self.run.tasks) / 8)
        return None

    def fisher(self) -> dict[str, float]:
        """Per-tensor diagonal Fisher of the run (computed once, kept as ``fisher.json``)."""
        path = self.out / "fisher.json"
        if not path.is_file():
            write_sensitivity(diagonal_fisher(self.run, progress=self.progress), path)
        return json.loads(path.read_text())

    def _trained_params(self) -> int:
        """Parameters in tensors that fine-tuning changed (frozen ones cost a pack nothing)."""
        if "trained_params" not in self.results:
            pre = open_checkpoint(self.run.pretrained_path)
            fts = [open_checkpoint(self.run.finetuned_path(t)) for t in self.run.tasks]
            self.results["trained_params"] = sum(
                pre.meta(k).numel for k in pre.keys()  # noqa: SIM118 -- a reader, not a dict
                if pre.meta(k).is_float and any(not torch.equal(pre.get(k), f.get(k)) for f in fts)
            )  # fmt: skip
        return self.results["trained_params"]

    def _fp32_info(self) -> None:
        if "fp32" not in self.results["precisions"]:
            fp32_bytes = open_checkpoint(self.run.pretrained_path).float_bytes()
            self.results["precisions"]["fp32"] = {"label": "FP32", "bytes_per_task": fp32_bytes, "bits_per_param": 32.0,
                                                  "bits_per_trained_param": 32.0, "rel_error": 0.0, "paper": True}  # fmt: skip

    # -- cells ------------------------------------------------------------------------------
    def references(self) -> None:
        """Zero-shot and the individual fine-tuned FP32 models (for normalized accuracy)."""
        self._cached("zero_shot", lambda: Cell("zero_shot", "fp32", "fixed", self.run.evaluate_all(None)))
        def individual() -> Cell:
            acc = {t: self.run.evaluate_all(self.run.finetuned_path(t), tasks=[t])[t] for t in self.run.tasks}
            return Cell("individual", "fp32", "fixed", acc)
        self._cached("individual|fp32|fixed", individual)

    def individual(self, precision: str) -> Cell:
        """Each task evaluated with its own quantized task vector: θ_pre + τ̂_t."""
        def compute() -> Cell:
            t0 = time.perf_counter()
            tvs = self.task_vectors(precision)
            pre = read_state_dict(self.run.pretrained_path)
            acc = {}
            for t in self.run.tasks:
                state = {k: (v.float() + tvs[t][k]).to(v.dtype) if k in tvs[t] else v for k, v in pre.items()}
                acc[t] = self.run.evaluate_all(state, tasks=[t])[t]
            return Cell("individual", precision, "fixed", acc, seconds=time.perf_counter() - t0)
        return self._cached(f"individual|{precision}|fixed", compute)

    def merged(self, method: str, precision: str, mode: str = "fixed") -> Cell:
        spec = METHODS[method]
        key = f"{method}|{precision}|{mode}"

        def compute() -> Cell:
            t0 = time.perf_counter()
            tvs = self.task_vectors(precision)
            options = dict(spec.options)
            if mode == "tuned" and spec.tune is not None:
                options[spec.tune] = self._tune(spec, tvs)
            acc = self._evaluate_merge(spec, tvs, options, "test")
            return Cell(method, precision, mode, acc, options, time.perf_counter() - t0)

        return self._cached(key, compute)

    def _merge_state(self, spec: MethodSpec, tvs: dict[str, TaskVector], options: dict, task: str | None = None) -> dict[str, torch.Tensor]:
        return merge_state_dict(spec.registry_name, self.run.pretrained_path, tvs, options, task=task)

    def _evaluate_merge(self, spec: MethodSpec, tvs: dict[str, TaskVector], options: dict, split: str) -> dict[str, float]:
        if spec.name == "adamerging":
            return self._adamerging(tvs, split)
        if spec.per_task:
            return {t: self.run.evaluate_all(self._merge_state(spec, tvs, options, t), split, tasks=[t])[t] for t in self.run.tasks}
        return self.run.evaluate_all(self._merge_state(spec, tvs, options), split)

    def _tune(self, spec: MethodSpec, tvs: dict[str, TaskVector]) -> float:
        """The value with the best average validation accuracy: over the grid, then past either
        edge while the edge wins (a λ chosen at the grid's edge says the grid was too narrow, not
        that the edge is best), a bounded number of steps."""
        def score(value: float) -> float:
            acc = self._evaluate_merge(spec, tvs, {**spec.options, spec.tune: value}, "validation")
            return sum(acc.values()) / len(acc)

        return tune_value(spec.grid, score)

    def _adamerging(self, tvs: dict[str, TaskVector], split: str) -> dict[str, float]:
        """Layer-wise AdaMerging on unlabeled test batches (the paper's setting, fewer steps)."""
        steps = int(self.results.get("adamerging_steps", 100))
        module = self.run.adamerging_module()
        batches, forward = self.run.adamerging_inputs(batch_size=16, split="test")
        result = adamerging(module, tvs, batches, forward=forward, steps=steps, lr=1e-3, init=0.3)
        with tempfile.TemporaryDirectory() as tmp:  # the method takes the coefficients file, as `tvq merge` does
            result.save(Path(tmp) / "coefficients.json")
            state = merge_state_dict("adamerging", self.run.pretrained_path, tvs, {"coefficients": Path(tmp) / "coefficients.json"})
        return self.run.evaluate_all(state, split)

    # -- the whole grid -------------------------------------------------------------------
    def run_grid(self, methods: Sequence[str], precisions: Sequence[str], tune: bool = True, individual: bool = True) -> None:
        self.references()
        self._fp32_info()
        cells: list[tuple[str | None, str]] = [(None, p) for p in precisions] if individual else []
        for p in precisions:
            for m in methods:
                cells.append((m, p))
        bar = tqdm(total=len(cells) + (sum(1 for m in methods if METHODS[m].tune) * len(precisions) if tune else 0),
                   desc="bench grid", unit="cell", disable=not self.progress)
        for method, p in cells:
            bar.set_postfix_str(f"{method or 'individual'} @ {p}")
            if method is None:
                self.individual(p)
            else:
                self.merged(method, p, "fixed")
                if tune and METHODS[method].tune:
                    bar.update(1)
                    self.merged(method, p, "tuned")
            bar.update(1)
        bar.close()


def resolve_names(given: str | None, known: dict[str, Any], what: str, default: Sequence[str]) -> list[str]:
    """A comma-separated selection ('all' for everything), validated against ``known``."""
    if given is None:
        return list(default)
    names = list(known) if given == "all" else [n.strip() for n in given.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"unknown {what} '{unknown[0]}'; valid: {', '.join(known)}")
    return names
