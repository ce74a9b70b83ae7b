"""``tvq merge``: options in, library call, one line out. Method options are free-form flags.

Method options are not declared to typer: ``--density 0.2 --lambda 0.3`` reach the command as
extra arguments, are parsed here (YAML scalars: numbers, ``1e-3`` included, booleans, lists,
mappings) and then validated by the method's pydantic model, strictly (``true`` is no number,
NaN/Inf no float), so an unknown option or a bad value is one line; one that looks like a typo
of a ``tvq merge`` flag (``--overwite``) is reported as that. ``--config`` takes tvq's merge
config or mergekit's YAML, either with a ``quantize:`` step (``tvq.merge.recipe``).
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from typer.core import TyperCommand

from tvq.config import load_yaml
from tvq.errors import ConfigError


def parse_method_args(args: list[str]) -> dict[str, Any]:
    """``['--density', '0.2', '--rescale', '--no-rescale', '--lambda=0.3']`` -> options dict."""
    opts: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r} (method options look like --name VALUE)")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            elif name.startswith("no-"):
                name, value = name[3:], "false"
            else:
                value = "true"
        key = name.replace("-", "_")
        if key in opts:
            raise ConfigError(f"method option --{name} given twice")
        try:
            opts[key] = load_yaml(value) if value.strip() else value
        except yaml.YAMLError:
            opts[key] = value
        i += 1
    return opts


def check_method_flags(cls: Any, options: dict[str, Any], command_flags: list[str]) -> None:
    """An extra flag the method does not know: a typo of a ``tvq merge`` flag (``--overwite``)
    or of a method option (``--densty``) is named with the likely flag; others are left to the
    method's own check (which lists its options)."""
    accepted = set(cls.Options.names()) | set(cls.Options.model_fields)
    options_flags = ["--" + n.replace("_", "-") for n in cls.Options.names()]
    for key in options:
        if key in accepted:
            continue
        flag = "--" + key.replace("_", "-")
        scored = [(difflib.SequenceMatcher(None, flag, c).ratio(), c, c in options_flags) for c in [*command_flags, *options_flags]]
        score, best, is_option = max(scored, default=(0.0, "", False))
        if score < 0.75:
            continue
        if is_option:
            raise ConfigError(f"merge method {cls.name!r}: unknown option {flag} (did you mean {best}?)")
        raise ConfigError(f"unknown flag {flag} (did you mean {best}? `tvq merge --help` lists the flags and every method's options)")


def command_flags(command: Any) -> list[str]:
    """The long flags a click command declares (``--overwrite``, ``--no-overwrite``, ...)."""
    return [o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ())) if o.startswith("--")]


class MethodsEpilog(TyperCommand):
    """``tvq merge --help`` ends with every method and its options, from the text generated
    from the registry (``tvq.methods_help``): the methods import torch, which help must not."""

    def format_help(self, ctx: Any, formatter: Any) -> None:  # typer's own (vendored) click types
        from tvq.methods_help import LINES

        methods = LINES
        blocks: list[str] = []
        for line in methods:  # a method's summary, then its options one per line
            if line.startswith("  ") and blocks:
                blocks[-1] += "\n" + line
            else:
                blocks.append(line)
        self.epilog = (
            "--config FILE: tvq's merge config or mergekit's YAML (merge_method, base_model, models, parameters, dtype), "
            "optionally with a quantize: step first (docs/merging.md).\n\nMethods and their options (flag type (default): meaning):\n\n"
            + "\n\n".join(blocks)
        )
        super().format_help(ctx, formatter)


def register(app: typer.Typer, handles_errors) -> None:
    """Add ``tvq merge`` to the main app."""

    @app.command(
        "merge",
        cls=MethodsEpilog,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    @handles_errors
    def merge_cmd(
        ctx: typer.Context,
        out: Annotated[
            Path, typer.Option("--out", "-o", help="Output: a folder or a .safetensors file (see --out-kind), or an EMR pack.")
        ],
        method: Annotated[
            str | None, typer.Option("--method", "-m", help="Merge method or alias (see below); method options follow as --name VALUE.")
        ] = None,
        pretrained: Annotated[
            Path | None,
            typer.Option("--pretrained", "-p", help="Pretrained model (required; checked against each pack's content hash)."),
        ] = None,
        pack: Annotated[
            list[Path] | None, typer.Option("--pack", help="A TVQ/RTVQ/FQ pack; repeatable, mixable with --finetuned.")
        ] = None,
        finetuned: Annotated[
            list[str] | None, typer.Option("--finetuned", "-f", help="NAME=PATH of an FP32 fine-tuned checkpoint; repeatable.")
        ] = None,
        tasks_from: Annotated[
            Path | None, typer.Option("--tasks-from", help="The paper's model folder (checkpoints/ViT-B-32): every <Task>/finetuned.pt in it.")
        ] = None,
        config: Annotated[
            Path | None,
            typer.Option(
                "--config",
                help="Merge config: tvq's (method, options, inputs) or mergekit's YAML (merge_method, models, ...), "
                "optionally with a quantize: step; flags override.",
            ),
        ] = None,
        load_config: Annotated[
            Path | None, typer.Option("--load-config", help="The paper's load_config.json; checked against the inputs.")
        ] = None,
        task: Annotated[str | None, typer.Option("--task", help="EMR: write this task's model instead of the unified pack.")] = None,
        unified: Annotated[Path | None, typer.Option("--unified", help="EMR: an existing unified pack to read --task from.")] = None,
        norm_stats: Annotated[
            str | None,
            typer.Option(
                "--norm-stats",
                help="Running statistics (BatchNorm running_mean/var, ...) of the output, never merged as weights: "
                "mean (of the tasks'; default for one merged model), pretrained or task:NAME; with --task the task's own. "
                "Best: re-estimate them on data (Python API, docs/merging.md).",
            ),
        ] = None,
        dtype: Annotated[
            str | None, typer.Option(help="Output dtype: same (pretrained's; default), float32, float16 or bfloat16.")
        ] = None,
        out_kind: Annotated[
            str,
            typer.Option(
                help="folder (weights, shards + index, model card, recipe; config and tokenizer of an HF pretrained folder), "
                "file (one .safetensors), or auto: a folder for an HF pretrained folder unless --out ends in .safetensors."
            ),
        ] = "auto",
        max_shard_size: Annotated[str, typer.Option(help="HF output: largest shard, e.g. 5GB or 500MB.")] = "5GB",
        overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
        unsafe_pickle: Annotated[bool, typer.Option(help="Allow full pickles for torch files you trust.")] = False,
        progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
        executor: Annotated[
            str,
            typer.Option(help="local, or ray (tensors merged over a Ray cluster; same output). EMR's unified pack and --unified run locally."),
        ] = "local",
        address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
        threads: Annotated[int, typer.Option(min=1, help="Local executor: tensors merged concurrently (torch single-threaded in each).")] = 2,
        device: Annotated[
            str,
            typer.Option(
                help="cpu, cuda or cuda:N: where large tensors merge, block by block (same bytes; methods that cannot, and small "
                "tensors, merge on the host)."
            ),
        ] = "cpu",
    ) -> None:
        """Merge task vectors (from packs and/or FP32 checkpoints) into one model, streaming."""
        from tvq.cli_support import console, parse_named_paths, print_line
        from tvq.config import PaperLoadConfig, read_config_file, validate_config
        from tvq.execute import make_executor
        from tvq.io.atomic import check_output
        from tvq.io.layouts import with_task_folders
        from tvq.merge.engine import emr_task_model, merge
        from tvq.merge.recipe import MERGEKIT_FILE, read_recipe, run_quantize_step
        from tvq.merge.registry import method_class, parse_options
        from tvq.merge.source import check_load_config, check_pack_bases, load_task_vectors
        from tvq.merge.statistics import NormStatsWarning
        from tvq.pack.reader import open_pack
        from tvq.runstats import RunMeter, output_bytes

        meter = RunMeter()
        plan = read_recipe(config) if config is not None else None
        cli_options = parse_method_args(list(ctx.args))
        if plan is not None and plan.schema == "mergekit" and method is not None:
            raise ConfigError(f"--method: {config} is a mergekit config, whose merge_method sets the method")
        name = method or (plan.method if plan is not None else None)
        if name is None:
            raise ConfigError("no merge method: pass --method NAME (or 'method:' in --config)")
        cls = method_class(name)
        check_method_flags(cls, cli_options, command_flags(ctx.command))
        options = {**(plan.options if plan is not None else {}), **cli_options}
        packs = list(pack or [])
        fts = parse_named_paths(finetuned or [])
        if tasks_from is not None:
            fts = with_task_folders(fts, tasks_from)
        tasks: list[str] | None = None
        quantize_step = None
        if plan is not None:
            if (packs or fts) and plan.schema == "mergekit":
                raise ConfigError(f"--pack/--finetuned: the models come from {config} (its models: entries)")
            if not (packs or fts):  # inputs given as flags replace the config's, a unified pack included
                packs, fts, tasks = list(plan.packs), dict(plan.finetuned), plan.tasks
                unified = unified or plan.unified
            pretrained = pretrained or plan.pretrained
            dtype = dtype or plan.dtype
            norm_stats = norm_stats or plan.norm_stats
            task = task or plan.task
            quantize_step = plan.quantize
        dtype = dtype or "same"
        if out_kind not in ("auto", "folder", "file"):
            raise ConfigError(f"--out-kind {out_kind!r}: expected auto, folder or file")
        writes_pack = cls.per_task and task is None  # EMR's unified pack: written locally, no Ray to start
        if quantize_step is not None:  # options and output checked before the quantize step's work
            parse_options(cls, options)
            check_output(out, overwrite, [Path(quantize_step.out)])
            q = run_quantize_step(quantize_step, overwrite=overwrite, progress=progress, executor=make_executor(executor, address, threads))
            console.print(f"wrote {quantize_step.out}: {q.manifest.method.label}, {len(q.manifest.tasks)} tasks", highlight=False)

        if unified is not None:
            if cls.name != "emr" or task is None:
                raise ConfigError("--unified reads an EMR pack: use it with --method emr --task NAME")
            if packs or fts or options:
                raise ConfigError("--unified already holds the merge: drop --pack/--finetuned and method options")
            if pretrained is None:
                raise ConfigError("--unified needs --pretrained")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NormStatsWarning)
                report = emr_task_model(
                    unified, pretrained, task, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                    norm_stats=norm_stats, out_kind=out_kind,  # type: ignore[arg-type]
                )  # fmt: skip
        else:
            if load_config is not None:
                lc = validate_config(PaperLoadConfig, read_config_file(load_config), load_config)
                check_load_config(lc, packs, len(fts))  # type: ignore[arg-type]
            if pretrained is None:
                if not packs:
                    raise ConfigError("--pretrained is required with --finetuned checkpoints")
                recorded = open_pack(packs[0]).manifest.pretrained.path[:300]
                raise ConfigError(f"--pretrained is required (a pack's recorded path is never opened unasked; {packs[0]} was made from {recorded})")
            pre, vectors = load_task_vectors(pretrained, packs=packs, finetuned=fts, unsafe_pickle=unsafe_pickle)
            check_pack_bases(pre, packs)  # before any output exists: a wrong base never leaves one
            if tasks is not None:
                missing = [t for t in tasks if t not in vectors]
                if missing:
                    raise ConfigError(f"{config}: task {missing[0]!r} is in none of the inputs (their tasks: {', '.join(vectors)})")
                vectors = vectors.select(tasks)
            extra = {MERGEKIT_FILE: plan.text} if plan is not None and plan.schema == "mergekit" else None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NormStatsWarning)
                report = merge(
                    cls.name, pre, vectors, out, options,
                    task=task, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                    inputs=[pretrained, *packs, *fts.values()], executor=None if writes_pack else make_executor(executor, address, threads),
                    unsafe_pickle=unsafe_pickle, norm_stats=norm_stats, out_kind=out_kind, extra_files=extra,  # type: ignore[arg-type]
                    device=device,
                )  # fmt: skip
        for w in caught:
            if issubclass(w.category, NormStatsWarning):
                print_line("warning", str(w.message))
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        what = "unified EMR pack" if writes_pack else "model"
        stats = f", {report.norm_stats} running statistics" if report.norm_stats else ""
        console.print(
            f"wrote {what} {out} ({report.method}, {len(report.tasks)} tasks, {len(report.files)} file(s), "
            f"{report.bytes_written / 2**20:.1f} MiB{stats})",
            highlight=False,
        )
        if report.kept is not None:  # top-k methods: what the trim kept against what was asked
            console.print(report.kept.line(), highlight=False)
        console.print(meter.stop(report.bytes_read, output_bytes(out)).line(), highlight=False)
