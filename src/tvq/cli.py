"""The ``tvq`` command: parses options, calls the library, prints. No logic of its own.

Each command imports the library it calls when it runs: ``tvq --help`` and option errors
answer without importing torch.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from tvq.bench.cli import app as bench_app
from tvq.cli_support import console, error_handler, new_app, parse_named_paths, print_line
from tvq.errors import ConfigError
from tvq.io.signals import Terminated, install_termination_handlers
from tvq.merge_cli import register as register_merge
from tvq.quant.selection import KeyRule

if TYPE_CHECKING:
    from tvq.encode.options import QuantizeOptions

app = new_app("tvq", "Task-vector quantization (FQ / TVQ / RTVQ) with bit-packed storage, and merging from the packs.")
handles_errors = error_handler("no output was written")


@app.command("quantize")
@handles_errors
def quantize_cmd(
    pretrained: Annotated[Path, typer.Option("--pretrained", "-p", help="Pretrained checkpoint (file or HF folder).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Pack directory to create.")],
    finetuned: Annotated[
        Optional[list[str]], typer.Option("--finetuned", "-f", help="NAME=PATH of a fine-tuned checkpoint (file or folder); repeat per task.")
    ] = None,
    tasks_from: Annotated[
        Optional[Path], typer.Option("--tasks-from", help="The paper's model folder (checkpoints/ViT-B-32): every <Task>/finetuned.pt in it.")
    ] = None,
    target: Annotated[Optional[str], typer.Option(help="task_vector (TVQ/RTVQ) or finetuned (FQ).")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Bits per task-vector (or offset) element, 1-8.")] = None,
    residual: Annotated[Optional[bool], typer.Option("--residual/--no-residual", help="RTVQ: shared base + per-task offsets.")] = None,
    base_bits: Annotated[Optional[int], typer.Option(help="RTVQ base-vector bits, 1-8 (default bits+1).")] = None,
    error_correction: Annotated[
        Optional[bool], typer.Option("--error-correction/--no-error-correction", help="RTVQ: offsets against the quantized base.")
    ] = None,
    config: Annotated[Optional[Path], typer.Option(help="The paper's quantize_config.json; flags override it.")] = None,
    key_rule: Annotated[KeyRule, typer.Option(help="ndim: quantize float tensors of 2+ dims; paper: the official key rule.")] = KeyRule.NDIM,
    quantizer: Annotated[str, typer.Option(help="minmax (paper), mse, group, symmetric, ternary (2 bits) or sign (1 bit).")] = "minmax",
    group_size: Annotated[int, typer.Option(help="Elements per scale for --quantizer group.")] = 128,
    entropy: Annotated[
        str,
        typer.Option(
            help="auto: entropy-code codes and exactly kept tensors where that makes them smaller; max: the same with zstd's "
            "optimal parser (smaller, far slower to write, as fast to read); off: plain bit packing (format 2)."
        ),
    ] = "auto",
    budget_bits: Annotated[
        Optional[float], typer.Option(help="Allocate bits per tensor: average bits per parameter per task, base included.")
    ] = None,
    budget_bytes: Annotated[Optional[int], typer.Option(help="Allocate bits per tensor so the pack fits in this many bytes.")] = None,
    sensitivity: Annotated[Optional[Path], typer.Option(help="JSON {tensor name: weight} for the allocation (e.g. mean Fisher); default 1.")] = None,
    allocation: Annotated[
        str,
        typer.Option(help="anchored: the largest fixed --bits scheme that fits, upgraded with the bytes left; free: every width by error alone."),
    ] = "anchored",
    average_out: Annotated[Optional[Path], typer.Option(help="Also write the averaged fine-tuned model here (.safetensors).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    unsafe_pickle: Annotated[bool, typer.Option(help="Allow full pickles for torch files you trust.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    executor: Annotated[str, typer.Option(help="local, or ray (tensors spread over a Ray cluster; same output).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="Local executor: tensors encoded concurrently (torch single-threaded in each).")] = 2,
    device: Annotated[
        str,
        typer.Option(help="cpu, cuda or cuda:N: where the min–max TVQ/RTVQ math runs (same codes; inputs read and hashed on the host)."),
    ] = "cpu",
) -> None:
    """Quantize task vectors (or fine-tuned weights) into a bit-packed pack."""
    from tvq.config import load_quantize_config
    from tvq.encode.options import QuantizeOptions
    from tvq.encode.pipeline import quantize
    from tvq.execute import make_executor
    from tvq.io.layouts import with_task_folders
    from tvq.runstats import RunMeter, output_bytes

    meter = RunMeter()
    opts = QuantizeOptions()
    if config is not None:
        cfg = load_quantize_config(config)
        opts = QuantizeOptions(
            target=cfg.quantize_target,
            bits=cfg.quantize_task_bit,
            residual=cfg.quantize_residual,
            base_bits=cfg.quantize_base_bit,
            error_correction=cfg.q_error_correction,
        )
    for field, value in (
        ("target", target),
        ("bits", bits),
        ("residual", residual),
        ("base_bits", base_bits),
        ("error_correction", error_correction),
    ):
        if value is not None:
            setattr(opts, field, value)
    opts.key_rule = key_rule
    opts.quantizer = quantizer
    opts.group_size = group_size
    opts.entropy = entropy  # type: ignore[assignment]  # checked by QuantizeOptions.validated
    check_quantize_numbers(opts, budget_bits, budget_bytes, allocation)
    named = with_task_folders(parse_named_paths(finetuned or []), tasks_from)
    run = functools.partial(
        quantize,
        average_out=average_out,
        overwrite=overwrite,
        unsafe_pickle=unsafe_pickle,
        progress=progress,
        executor=make_executor(executor, address, threads),
        device=device,
    )
    if budget_bits is not None or budget_bytes is not None:
        from tvq.encode.budget import quantize_within_budget

        run = functools.partial(
            quantize_within_budget, budget_bits=budget_bits, budget_bytes=budget_bytes, sensitivity=read_sensitivity(sensitivity),
            allocation=allocation, **run.keywords,
        )  # fmt: skip
    report = run(pretrained, named, out, opts)
    m = report.manifest
    console.print(
        f"wrote {out}: {m.method.label}, {len(m.tasks)} tasks, {report.bytes_written / 2**20:.2f} MiB on disk",
        highlight=False,
    )
    if average_out is not None:
        console.print(f"wrote averaged fine-tuned model {average_out}", highlight=False)
    console.print(meter.stop(report.bytes_read, output_bytes(out, average_out)).line(), highlight=False)


def read_sensitivity(path: Path | None) -> dict[str, float] | None:
    """A JSON/YAML mapping of tensor name to a non-negative weight."""
    if path is None:
        return None
    from tvq.config import read_config_file
    from tvq.encode.budget import check_sensitivity

    return check_sensitivity(read_config_file(path), path)


def check_quantize_numbers(opts: QuantizeOptions, budget_bits: float | None, budget_bytes: int | None, allocation: str = "anchored") -> None:
    """Options typer parses but no pack can hold, one line each, before anything is read."""
    opts.validated()  # returns a checked copy: the caller's options stay as given
    from tvq.encode.budget import ALLOCATIONS

    if allocation not in ALLOCATIONS:
        raise ConfigError(f"--allocation {allocation!r} is unknown: choose {' or '.join(ALLOCATIONS)}")
    if budget_bits is not None or budget_bytes is not None:
        from tvq.encode.budget import check_budget

        check_budget(budget_bits, budget_bytes)


@app.command("average")
@handles_errors
def average_cmd(
    finetuned: Annotated[list[str], typer.Option("--finetuned", "-f", help="NAME=PATH; repeat per task.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    overwrite: bool = False,
    unsafe_pickle: bool = False,
    progress: bool = True,
) -> None:
    """Write the averaged fine-tuned model (the RTVQ reference θ_avg)."""
    from tvq.encode.pipeline import average_checkpoints

    average_checkpoints(parse_named_paths(finetuned), out, overwrite=overwrite, unsafe_pickle=unsafe_pickle, progress=progress)
    console.print(f"wrote {out}", highlight=False)


@app.command("info")
@handles_errors
def info_cmd(
    pack: Annotated[Path, typer.Argument(help="Pack directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    verify: Annotated[bool, typer.Option(help="Also re-hash every file.")] = False,
) -> None:
    """Tasks, method, bits, bytes on disk, compression ratio and quantization error."""
    from tvq.report import pack_summary

    summary = pack_summary(pack, verify=verify)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"{pack}  {summary['method']['label']}  ({summary['method']['key_rule']} key rule)", style="bold")
    table = Table(show_footer=True)
    table.add_column("task", footer="total")
    table.add_column("bytes on disk", justify="right", footer=f"{summary['total_bytes']:,}")
    table.add_column("bits/param", justify="right", footer=f"{summary['bits_per_param']:.3f}")
    table.add_column("FP32 bytes", justify="right", footer=f"{summary['total_fp32_bytes']:,}")
    table.add_column("ratio", justify="right", footer=f"{summary['ratio']:.1f}x")
    table.add_column("rel. error\nquantized", justify="right")
    table.add_column("rel. error\nall", justify="right")
    for t in summary["tasks"]:
        quantized = "n/a" if t["rel_error_quantized"] is None else f"{t['rel_error_quantized']:.4f}"
        table.add_row(
            t["name"], f"{t['bytes']:,}", f"{t['bits_per_param']:.3f}", f"{t['fp32_bytes']:,}", f"{t['ratio']:.1f}x",
            quantized, f"{t['rel_error']:.4f}",
        )  # fmt: skip
    console.print(table)
    console.print(
        "rel. error = ||τ̂ − τ|| / ||τ|| per task, over the quantized tensors and over all tensors (exactly stored ones"
        " add no error)" + ("; n/a: this older pack records only the latter" if any(
            t["rel_error_quantized"] is None for t in summary["tasks"]) else ""),
        highlight=False,
    )  # fmt: skip
    if summary["statistics"]:
        console.print(
            f"running statistics: {len(summary['statistics'])} tensors stored exactly per task (never merged as weights;"
            " tvq merge --norm-stats chooses them)",
            highlight=False,
        )
    if summary["base_bytes"]:
        console.print(f"base vector: {summary['base_bytes']:,} bytes (shared; each task above carries 1/T of it)", highlight=False)
    if len(summary["allocation"].get("tasks", {})) > 1 or summary["method"]["budget_bits"] is not None:
        for part, hist in summary["allocation"].items():
            spread = ", ".join(f"{b} bits: {h['tensors']} tensors / {h['params']:,} params" for b, h in hist.items())
            console.print(f"allocation ({part}): {spread}", highlight=False)
    coding = summary["entropy"]
    if coding["coded_tensors"]:
        console.print(
            f"entropy coding: {coding['coded_tensors']} of {coding['quantized_tensors']} quantized tensors; codes take "
            f"{coding['stored_bytes']:,} bytes on disk instead of {coding['plain_bytes']:,} bit-packed "
            f"(saved {coding['saved_bytes']:,}, {coding['saved_bytes'] / max(coding['plain_bytes'], 1):.1%})",
            highlight=False,
        )
    if coding["raw_coded_tensors"]:
        console.print(
            f"entropy coding: {coding['raw_coded_tensors']} of {coding['raw_tensors']} exactly stored tensors; they take "
            f"{coding['raw_stored_bytes']:,} bytes on disk instead of {coding['raw_plain_bytes']:,} "
            f"(saved {coding['raw_saved_bytes']:,}, {coding['raw_saved_bytes'] / max(coding['raw_plain_bytes'], 1):.1%})",
            highlight=False,
        )
    console.print(
        f"theoretical size {summary['theoretical_bytes']:,} bytes; on disk {summary['total_bytes']:,} "
        f"(+{summary['overhead_bytes']:,} headers/manifest)" + ("; checksums verified" if verify else ""),
        highlight=False,
    )


@app.command("export")
@handles_errors
def export_cmd(
    pack: Annotated[Path, typer.Argument(help="Pack directory.")],
    task: Annotated[str, typer.Option(help="Task name.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output .safetensors file; with --model and a torch pretrained file, .pt writes its format.")
    ],
    pretrained: Annotated[Optional[Path], typer.Option("--pretrained", "-p", help="Pretrained model (needed with --model and for FQ packs).")] = None,
    model: Annotated[bool, typer.Option("--model", help="Write θ_pre + τ̂ instead of the task vector.")] = False,
    dtype: Annotated[str, typer.Option(help="Model dtype with --model: same, float32, float16 or bfloat16.")] = "same",
    overwrite: bool = False,
    unsafe_pickle: bool = False,
    progress: bool = True,
    out_kind: Annotated[
        str, typer.Option(help="file (default), or folder with --model: weights plus the HF pretrained folder's config and tokenizer.")
    ] = "file",
) -> None:
    """Write one task's dequantized fp32 task vector (or its model) as safetensors."""
    from tvq.export import export_task

    if out_kind not in ("file", "folder"):
        raise ConfigError(f"--out-kind {out_kind!r}: expected file or folder")
    export_task(pack, task, out, pretrained=pretrained, model=model, dtype=dtype, overwrite=overwrite, unsafe_pickle=unsafe_pickle,
                progress=progress, out_kind=out_kind)  # fmt: skip
    console.print(f"wrote {out}", highlight=False)


@app.command("add")
@handles_errors
def add_cmd(
    pack: Annotated[Path, typer.Argument(help="Pack directory to grow.")],
    finetuned: Annotated[list[str], typer.Option("--finetuned", "-f", help="NAME=PATH of a new task; repeat.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write a new pack here instead of updating PACK.")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Update PACK itself (atomically).")] = False,
    pretrained: Annotated[
        Optional[Path], typer.Option("--pretrained", "-p", help="Pretrained model the pack was made from (required; checked by content hash).")
    ] = None,
    overwrite: bool = False,
    unsafe_pickle: bool = False,
    progress: bool = True,
) -> None:
    """Add tasks to a pack without re-encoding the others (RTVQ keeps its base)."""
    from tvq.encode.incremental import add_tasks
    from tvq.runstats import RunMeter

    meter = RunMeter()
    if (out is None) == (not in_place):
        raise ConfigError("give either --out NEW_PACK or --in-place")
    report = add_tasks(
        pack, parse_named_paths(finetuned), out, pretrained=pretrained, overwrite=overwrite, unsafe_pickle=unsafe_pickle, progress=progress
    )
    added = ", ".join(t.name for t in report.manifest.tasks[-len(finetuned) :])
    console.print(f"added {added} to {out or pack} ({report.bytes_written / 2**20:.2f} MiB new)", highlight=False)
    console.print(meter.stop(report.bytes_read, report.bytes_written).line(), highlight=False)  # old files are linked, not written


@app.command("rebase")
@handles_errors
def rebase_cmd(
    pack: Annotated[Path, typer.Argument(help="RTVQ pack.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New pack.")],
    finetuned: Annotated[
        Optional[list[str]], typer.Option("--finetuned", "-f", help="NAME=PATH of every task's original checkpoint (checked by content hash).")
    ] = None,
    from_pack: Annotated[bool, typer.Option("--from-pack", help="Use the pack's reconstructions, not the original checkpoints.")] = False,
    pretrained: Annotated[Optional[Path], typer.Option("--pretrained", "-p", help="Pretrained model the pack was made from (required).")] = None,
    overwrite: bool = False,
    unsafe_pickle: bool = False,
    progress: bool = True,
) -> None:
    """Recompute an RTVQ pack's base over all its tasks and re-encode the offsets."""
    from tvq.encode.incremental import rebase
    from tvq.runstats import RunMeter, output_bytes

    meter = RunMeter()
    sources = parse_named_paths(finetuned) if finetuned else None
    report = rebase(
        pack, out, pretrained=pretrained, finetuned=sources, from_pack=from_pack, overwrite=overwrite, unsafe_pickle=unsafe_pickle, progress=progress
    )
    console.print(f"wrote {out}: {report.manifest.method.label}, {len(report.manifest.tasks)} tasks", highlight=False)
    console.print(meter.stop(report.bytes_read, output_bytes(out)).line(), highlight=False)


@app.command("verify")
@handles_errors
def verify_cmd(pack: Annotated[Path, typer.Argument(help="Pack directory.")]) -> None:
    """Check the manifest and every file's checksum."""
    from tvq.pack.reader import open_pack

    open_pack(pack).verify()
    console.print(f"{pack}: ok", highlight=False)


# Merging and the benchmark live in their own packages; their command modules are light.
register_merge(app, handles_errors)
app.add_typer(bench_app, name="bench", help="The real benchmark: build fine-tuned models, run every method x precision.")

# Large CPU tensors on transparent huge pages: torch reads this once, at its first allocation,
# so the entry point sets it before any command imports torch. Reading a 1.1B-parameter
# checkpoint into fresh buffers is then 3.8x faster (512x fewer page faults). The library
# itself never changes its host's environment; opt out with THP_MEM_ALLOC_ENABLE=0.
HUGE_PAGES = ("THP_MEM_ALLOC_ENABLE", "1")


def main() -> None:
    """The ``tvq`` entry point: huge pages for torch's allocations, and SIGTERM/SIGHUP turned
    into an exception (here, not on import), so temporaries are removed and the run ends with
    one line and exit status 143 (129)."""
    os.environ.setdefault(*HUGE_PAGES)
    install_termination_handlers()
    try:
        app()
    except Terminated as exc:  # outside a command (while parsing): nothing was written yet
        print_line("terminated", "no output was written")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
