"""``tvq bench``: fetch the task data, build the fine-tuned checkpoints, evaluate a model.

Thin: parses options, calls ``tvq.bench``, prints. A data problem is one line and exit 1,
any other tvq error one line and exit 2; heavy imports happen inside the commands.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from tvq.bench import BenchDataError, BenchError
from tvq.cli_support import console, error_handler, new_app

app = new_app(
    "bench", "The real benchmarks: 8 text tasks (MiniLM) or 6 image tasks (EfficientNet-Lite0, --suite vision), from packages, frozen heads."
)
_errors = error_handler("completed work is kept; re-run to resume", ((BenchDataError, 1),))

Cache = Annotated[Optional[Path], typer.Option("--cache", help="Data/run cache (default $TVQ_CACHE or ~/.cache/tvq/bench).")]
Preset = Annotated[str, typer.Option("--preset", help="full (8 tasks, 4,000 train) or ci (4 tasks, 512 train).")]
Tasks = Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated task names (or name=file.jsonl); default: the preset's.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Split and training seed (default 0).")]
SuiteOpt = Annotated[
    str, typer.Option("--suite", help="text (MiniLM, 8 text tasks) or vision (EfficientNet-Lite0 or your image encoder, 6 image tasks).")
]
Encoder = Annotated[
    Optional[str],
    typer.Option(
        help="text: another HF encoder folder. vision: an HF CLIPModel/CLIPVisionModel folder, or KIND[:ARG] of an encoder "
        "registered with tvq.bench.vision.register_encoder (default efficientnet-lite0)."
    ),
]
ImageSize = Annotated[
    Optional[int], typer.Option("--image-size", help="vision: input side in px (default 64; ci 48; a CLIP tower needs its own, e.g. 224).")
]
Head = Annotated[
    Optional[str], typer.Option("--head", help="vision: class_mean (default) or text (CLIP zero-shot text heads; needs a CLIPModel folder).")
]


def _config(suite: str, preset_name: str, tasks: str | None, seed: int | None, **extra: Any) -> Any:
    from tvq.bench.suites import get_suite

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    return get_suite(suite).preset(preset_name, tasks=names, seed=seed, **{k: v for k, v in extra.items() if v is not None})


@app.command("data")
@_errors
def data_cmd(preset: Preset = "full", tasks: Tasks = None, cache: Cache = None, seed: Seed = None, suite: SuiteOpt = "text") -> None:
    """Fetch and convert the tasks' data (cached), and show classes and split sizes."""
    from tvq.bench.suites import get_suite

    config = _config(suite, preset, tasks, seed)
    table = Table(title=f"tvq bench data ({suite}, {config.preset} splits, seed {config.seed})")
    for col in ("task", "source", "classes", "examples", "train", "val", "test"):
        table.add_column(col, justify="right" if col in ("examples", "train", "val", "test") else "left")
    for name, source, class_names, n, sizes in get_suite(suite).data_rows(config, cache):
        names = ", ".join(class_names)
        classes = f"{len(class_names)}: {names if len(names) <= 40 else names[:37] + '...'}"
        table.add_row(name, source, classes, f"{n:,}", *(f"{k:,}" for k in sizes.values()))
    console.print(table)


@app.command("build")
@_errors
def build_cmd(
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run folder (default <cache>/runs/<preset>, vision: runs/vision-<preset>).")
    ] = None,
    preset: Preset = "full",
    tasks: Tasks = None,
    cache: Cache = None,
    seed: Seed = None,
    suite: SuiteOpt = "text",
    encoder: Encoder = None,
    image_size: ImageSize = None,
    head: Head = None,
    force: Annotated[bool, typer.Option(help="Rebuild a run folder made with other settings.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Fine-tune one encoder per task (cached, resumable) and save models, heads and splits."""
    import torch

    from tvq.bench.suites import get_suite

    if threads:
        torch.set_num_threads(threads)
    if suite == "text" and (image_size is not None or head is not None):
        raise BenchError("--image-size and --head are options of --suite vision")
    config = _config(suite, preset, tasks, seed, encoder=encoder, image_size=image_size, head=head)
    t0 = time.perf_counter()
    manifest = get_suite(suite).build(config, out, cache_dir=cache, force=force, progress=progress, log=lambda s: console.print(s, highlight=False))
    table = Table(title=f"tvq bench build ({suite}, {config.preset}) in {time.perf_counter() - t0:.0f} s")
    for col in ("task", "classes", "train", "test", "zero-shot %", "fine-tuned %", "train s"):
        table.add_column(col, justify="left" if col == "task" else "right")
    zs, ft = [], []
    for name in (t.split("=", 1)[0] for t in config.tasks):  # "name=file.jsonl" is task "name"
        info = manifest["task_info"][name]
        zs.append(100 * info["zero_shot"]["test"])
        ft.append(100 * info["finetuned"]["test"])
        sizes = info["splits"]["sizes"]
        table.add_row(
            name,
            str(len(info["classes"])),
            str(sizes["train"]),
            str(sizes["test"]),
            f"{zs[-1]:.1f}",
            f"{ft[-1]:.1f}",
            f"{info['timings']['train_s']:.0f}",
        )
    table.add_row("average", "", "", "", f"{sum(zs) / len(zs):.1f}", f"{sum(ft) / len(ft):.1f}", "", style="bold")
    console.print(table)


@app.command("eval")
@_errors
def eval_cmd(
    run: Annotated[Path, typer.Argument(help="A run folder made by `tvq bench build`.")],
    model: Annotated[Optional[Path], typer.Argument(help="HF folder or .safetensors to evaluate (default: the pretrained model).")] = None,
    tasks: Tasks = None,
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Accuracy of a model (e.g. a merged one) on every task of a run (vision: BN statistics by the run's rule)."""
    import torch

    from tvq.bench.evaluate import open_run

    if threads:
        torch.set_num_threads(threads)
    r = open_run(run)
    names = [t.strip() for t in tasks.split(",")] if tasks else None
    t0 = time.perf_counter()
    acc = r.evaluate_all(model, split, names)
    table = Table(title=f"{model or 'pretrained'} on {run} ({split}, {time.perf_counter() - t0:.0f} s)")
    table.add_column("task")
    table.add_column("accuracy %", justify="right")
    for name, a in acc.items():
        table.add_row(name, f"{100 * a:.1f}")
    table.add_row("average", f"{100 * sum(acc.values()) / len(acc):.1f}", style="bold")
    console.print(table)


@app.command("fisher")
@_errors
def fisher_cmd(
    run: Annotated[Path, typer.Argument(help="A run folder made by `tvq bench build`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON to write, for `tvq quantize --sensitivity`.")],
    examples: Annotated[int, typer.Option(min=1, help="Validation examples per task.")] = 32,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Per-tensor diagonal Fisher of the fine-tuned models: data-driven sensitivity for bit allocation."""
    import torch

    from tvq.bench.evaluate import open_run
    from tvq.bench.fisher import diagonal_fisher, write_sensitivity

    if threads:
        torch.set_num_threads(threads)
    weights = diagonal_fisher(open_run(run), examples=examples)
    write_sensitivity(weights, out)
    top = sorted(weights.items(), key=lambda kv: -kv[1])[:5]
    console.print(f"wrote {out}: {len(weights)} tensors; most sensitive: " + ", ".join(f"{k} ({v:.2g})" for k, v in top), highlight=False)


from tvq.bench.run_cmd import run_cmd  # noqa: E402  (its own module: the grid's options are many)

app.command("run")(_errors(run_cmd))
