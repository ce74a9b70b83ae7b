"""``tvq bench run``: every merging method x every precision, with tables and plots.

Builds the run first when it is missing (so one command does the whole job), quantizes the
task vectors to each precision with tvq, merges from the packs, evaluates every task, and
writes results.json, results.md and two PNG plots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tvq.cli_support import console

PAPER_PRECISIONS = ("fp32", "fq8", "fq4", "tvq8", "tvq4", "tvq3", "tvq2", "rtvq-b3o2", "rtvq-b3o2-ec", "rtvq-b4o2-ec", "rtvq-b2o2-ec")
DEFAULT_METHODS = ("task_arithmetic", "ties", "lines", "consensus", "emr", "dare", "breadcrumbs", "magmax", "average", "adamerging",
                   "tsv_merge", "iso_c", "iso_cts", "model_stock", "della")  # fmt: skip


def run_cmd(
    run: Annotated[
        Optional[Path],
        typer.Option(
            "--run", help="Run folder from `tvq bench build` (default <cache>/runs/<preset>, vision: runs/vision-<preset>; built if missing)."
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out", "-o", help="Where packs, results and plots go (default <run>/grid; <run>/grid-bn-<rule> for a non-default --bn-stats)."
        ),
    ] = None,
    preset: Annotated[str, typer.Option(help="Preset used when the run has to be built: ci or full.")] = "full",
    suite: Annotated[
        str, typer.Option(help="Suite used when the run has to be built: text or vision (an existing run's own suite is used otherwise).")
    ] = "text",
    bn_stats: Annotated[
        Optional[str],
        typer.Option(
            "--bn-stats",
            help="vision: BatchNorm statistics of evaluated models: task (default: re-estimated per task), pooled, pretrained or merged.",
        ),
    ] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Data/run cache (default $TVQ_CACHE or ~/.cache/tvq/bench).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated merge methods, or 'all'.")] = None,
    precisions: Annotated[
        Optional[str], typer.Option(help="Comma-separated precisions (fp32, fq4, tvq2, rtvq-b3o2-ec, budget-2.375, ...), 'paper' or 'all'.")
    ] = None,
    tune: Annotated[bool, typer.Option(help="Also tune λ on the validation split.")] = True,
    adamerging_steps: Annotated[int, typer.Option(help="AdaMerging optimisation steps (the paper: 500 epochs x 8 tasks).")] = 100,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Evaluate every method x precision; write results.json, results.md and plots."""
    import torch

    from tvq.bench import BenchError
    from tvq.bench.evaluate import open_run
    from tvq.bench.matrix import METHODS, PRECISIONS, Matrix, resolve_names
    from tvq.bench.suites import get_suite
    from tvq.bench.tables import markdown_table, plots, write_report

    if threads:
        torch.set_num_threads(threads)
    method_names = resolve_names(methods, METHODS, "method", DEFAULT_METHODS)
    if precisions == "paper":
        precisions = None
    precision_names = resolve_names(precisions, PRECISIONS, "precision", PAPER_PRECISIONS)
    t0 = time.perf_counter()
    kit = get_suite(suite)
    if run is None:
        run = kit.default_run(cache, preset)
    if not (Path(run) / "manifest.json").is_file():
        kit.build(kit.preset(preset), run, cache_dir=cache, progress=progress, log=lambda s: console.print(s, highlight=False))
    opened = open_run(run)
    if bn_stats is not None:
        if opened.suite != "vision":
            raise BenchError("--bn-stats applies to vision runs (BatchNorm); this run is a text one")
        from tvq.bench.vision.run import VisionRun

        opened = VisionRun(run, bn_stats=bn_stats)
    default_out = "grid" if bn_stats in (None, "task") else f"grid-bn-{bn_stats}"
    out = Path(out) if out is not None else Path(run) / default_out
    matrix = Matrix(opened, out, progress=progress)
    matrix.results["adamerging_steps"] = adamerging_steps
    matrix.run_grid(method_names, precision_names, tune=tune)
    report = write_report(matrix.results, out)
    images = plots(matrix.results, out)
    console.print(f"\nAverage accuracy (%), λ fixed — {len(matrix.run.tasks)} tasks, {time.perf_counter() - t0:.0f} s")
    _print_markdown(markdown_table(matrix.results))
    console.print(f"wrote {report}, {out / 'results.json'}, " + ", ".join(map(str, images)), highlight=False)


def _print_markdown(md: str) -> None:
    """Render the Markdown grid as a rich table in the terminal."""
    rows = [r.strip("|").split("|") for r in md.splitlines() if not r.startswith("|---")]
    table = Table()
    for i, h in enumerate(rows[0]):
        table.add_column(h.strip(), justify="left" if i == 0 else "right")
    for r in rows[1:]:
        table.add_row(*(c.strip() for c in r))
    console.print(table)
