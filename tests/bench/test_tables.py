"""Benchmark reports: the numbers in results.md and the plots come from results.json alone."""

from __future__ import annotations

import math

import pytest

from tvq.bench.matrix import PRECISIONS, scheme_family
from tvq.bench.tables import average_halfwidth, markdown_table, per_task_table, plots, wilson_halfwidth, write_report


def _results() -> dict:
    tasks = ["a", "b"]
    cells = {"zero_shot": {"method": "zero_shot", "precision": "fp32", "mode": "fixed", "acc": {"a": 0.5, "b": 0.6}}}
    for method, base in [("individual", 0.9), ("task_arithmetic", 0.8)]:
        for precision, drop in [("fp32", 0.0), ("fq4", 0.3), ("tvq4", 0.0), ("tvq2", 0.02)]:
            cells[f"{method}|{precision}|fixed"] = {"method": method, "precision": precision, "mode": "fixed",
                                                     "acc": {"a": base - drop, "b": base - drop - 0.1}}  # fmt: skip
    info = {
        "fp32": (32.0, 32.0, 4e6),
        "fq4": (4.06, 8.5, 5e5),
        "tvq4": (1.97, 4.12, 2.5e5),
        "tvq2": (1.02, 2.13, 1.3e5),
    }
    precisions = {p: {"label": PRECISIONS[p].label, "bits_per_param": b, "bits_per_trained_param": t, "bytes_per_task": n, "paper": True}
                  for p, (b, t, n) in info.items()}  # fmt: skip
    return {"run": "r", "suite": "text", "tasks": tasks, "cells": cells, "precisions": precisions, "test_sizes": {"a": 200, "b": 100}}


def test_wilson_halfwidth_matches_the_closed_form_bounds():
    for p, n in [(0.5, 100), (0.95, 200), (0.0, 50), (1.0, 1000)]:
        z = 1.96
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        lo, hi = centre - spread, centre + spread
        assert wilson_halfwidth(p, n) == pytest.approx(100 * (hi - lo) / 2)
    assert wilson_halfwidth(0.9, 200) > wilson_halfwidth(0.9, 2000)


def test_average_interval_shrinks_with_tasks_and_examples():
    one = average_halfwidth({"a": 0.8}, {"a": 200})
    assert one == pytest.approx(100 * 1.96 * math.sqrt(0.8 * 0.2 / 200))
    assert average_halfwidth({"a": 0.8, "b": 0.8}, {"a": 200, "b": 200}) == pytest.approx(one / math.sqrt(2))


def test_tables_report_bits_per_trained_param_and_intervals():
    r = _results()
    table = markdown_table(r)
    assert "| bits/trained param/task | 32.00 | 8.50 | 4.12 | 2.13 |" in table
    rows = per_task_table(r).splitlines()
    ta = next(line for line in rows if line.startswith("| task_arithmetic"))
    assert f"80.0 ±{wilson_halfwidth(0.8, 200):.1f}" in ta and f"70.0 ±{wilson_halfwidth(0.7, 100):.1f}" in ta


def test_scheme_families_join_only_widths_of_one_scheme():
    assert {scheme_family(p) for p in ("tvq8", "tvq4", "tvq2")} == {"TVQ"}
    assert {scheme_family(p) for p in ("fq8", "fq4")} == {"FQ"}
    assert scheme_family("rtvq-b3o2") == "RTVQ" and scheme_family("rtvq-b2o2-ec") == "RTVQ+EC"
    assert scheme_family("budget-1.2") == "budget" and scheme_family("budget-0.8-fisher") == "budget, Fisher"
    assert scheme_family("tvq2-mse") == "tvq2-mse"  # not joined to the min-max widths
    assert all(PRECISIONS[p].family == scheme_family(p) for p in PRECISIONS)


def test_report_and_plots_are_written(tmp_path):
    r = _results()
    written = plots(r, tmp_path)
    assert [p.name for p in written] == ["accuracy_vs_bits.png", "accuracy_vs_bytes.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    text = write_report(r, tmp_path).read_text()
    assert "Sampling error: 100–200 test examples per task" in text
