"""Scaling report (issue 19): time and peak memory of tvq and mergekit against the number of
tasks T at a fixed model size, and against model size at a fixed T, in one run.

For every point (model size, T) this runs, each in a fresh child process and with the same
settings as ``benchmarks/llm/run.py`` (whose step builder and measuring code it uses):

* ``tvq quantize`` TVQ 4-bit (``--bits 4``, entropy coding ``auto``, ``--threads 2``);
* ``tvq merge`` task arithmetic (λ = 0.3) and TIES (density 0.2, disjoint mean, λ = 0.3,
  ``--scope tensor``) from that pack;
* ``mergekit-yaml`` ``task_arithmetic`` and ``ties`` with the same λ / density from the bf16
  checkpoints (``--skip-mergekit`` to leave them out).

Each step records wall seconds, CPU seconds (user + sys of the child and its descendants, from
``wait4`` via ``/usr/bin/time -v``: the fair column on a shared machine), max RSS (the child's
``ru_maxrss``, which counts mapped file pages) and peak anonymous memory (the process tree's
``RssAnon``, polled every 0.1 s). Merged models are hashed and deleted; packs are deleted
after their point's merges (``--keep-packs`` keeps them).

Model families are synthetic Llama checkpoints from ``benchmarks/llm/make_models.py``. A size
is a preset name (``tiny``, ``0.3B``, ``1.1B``), optionally ``=DIR`` for an existing family's
``models`` folder (read only: the point's folder links to it); without ``=DIR`` the family is
made under ``WORKDIR/SIZE/models`` when missing. Writes ``OUT.json``, ``OUT.md`` and ``OUT.png``
(``--out``, default ``WORKDIR/scaling``), the JSON after every step.

Usage::

    python benchmarks/scaling.py --workdir /work/bench_scale --tasks 2,4,8,16 --sweep-size 0.3B \\
        --sizes 0.3B,1.1B=/work/bench_llm/models --size-tasks 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


llm_run = _load("tvq_bench_llm_run", HERE / "llm" / "run.py")
make_models = _load("tvq_bench_llm_make_models", HERE / "llm" / "make_models.py")

#: make_models.py shapes (``--layers --hidden --intermediate --heads --kv-heads --vocab``)
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 256},
    "0.3B": {"layers": 8, "hidden": 1536, "intermediate": 4096, "heads": 12, "kv_heads": 4, "vocab": 32000},
    "1.1B": {"layers": 22, "hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000},
}
PACK = "tvq4"
SHORT = {"task_arithmetic": "ta", "ties": "ties"}
#: (tool, method) series of the plot and of the growth table; method None = quantize
SERIES = [
    ("tvq", None, "tvq quantize TVQ4"),
    ("tvq", "task_arithmetic", "tvq merge TA"),
    ("tvq", "ties", "tvq merge TIES"),
    ("mergekit", "task_arithmetic", "mergekit TA"),
    ("mergekit", "ties", "mergekit TIES"),
]


def shape_params(size: str) -> int:
    shape = PRESETS[size]
    return make_models.LlamaShape(
        shape["hidden"], shape["layers"], shape["intermediate"], shape["heads"], shape["kv_heads"], shape["vocab"]
    ).n_params()


def ensure_family(models: Path, size: str, tasks: int, generate: bool) -> None:
    """Make ``base`` and ``ft0`` … ``ft{tasks-1}`` under ``models`` when missing (make_models.py)."""
    names = ["base", *(f"ft{t}" for t in range(tasks))]
    missing = [n for n in names if not (models / n / "model.safetensors.index.json").exists()]
    if not missing:
        return
    if not generate:
        raise SystemExit(f"models missing under {models}: {missing} (drop --skip-generate to make them)")
    shape = PRESETS[size]
    argv = ["--workdir", str(models.parent), "--tasks", str(tasks), "--no-verify", "--only", *missing]
    for key, value in shape.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    if models.name != "models":
        raise SystemExit(f"{models}: make_models.py writes WORKDIR/models; pass a folder named 'models'")
    make_models.main(argv)


def points(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(size, T) in run order: the T sweep ascending, then the other sizes; the largest T last
    (its mergekit TIES is the longest step)."""
    out = [(args.sweep_size, t) for t in sorted(args.tasks)]
    for size in args.sizes:
        if (size, args.size_tasks) not in out:
            out.append((size, args.size_tasks))
    last = max(out, key=lambda p: (p[1], shape_params(p[0])))
    return [p for p in out if p != last] + [last]


def point_steps(args: argparse.Namespace, size: str, n_tasks: int) -> tuple[list[Any], argparse.Namespace, Path]:
    """run.py's steps for one point: its workdir ``WORKDIR/points/SIZE-TT`` links ``models`` to the family."""
    pdir = args.workdir / "points" / f"{size}-T{n_tasks}"
    pdir.mkdir(parents=True, exist_ok=True)
    link = pdir / "models"
    family = args.family[size].resolve()
    if link.is_symlink() and link.resolve() != family:
        link.unlink()
    if not link.exists():
        link.symlink_to(family, target_is_directory=True)
    run_args = llm_run.build_parser().parse_args(
        ["--workdir", str(pdir), "--tasks", str(n_tasks), "--packs", PACK, "--no-ckpt-merge", "--tvq-threads", str(args.threads)]
        + [f"--env={item}" for item in args.env]
    )
    tasks = [f"ft{t}" for t in range(n_tasks)]
    llm_run.write_mergekit_configs(pdir / "configs", link, tasks)
    wanted = {f"quantize_{PACK}"} | {f"merge_{SHORT[m]}_{PACK}" for m in args.methods}
    if not args.skip_mergekit:
        wanted |= {f"mergekit_{SHORT[m]}" for m in args.methods}
    steps = [s for s in llm_run.build_steps(run_args, tasks, True, pdir) if s.name in wanted]
    order = {"quantize": 0, "merge": 1, "mergekit": 2}  # tvq first; mergekit TIES, the slowest, last
    steps.sort(key=lambda s: (order[s.kind], s.name.startswith("mergekit_ties")))
    return steps, run_args, pdir


def record(size: str, n_tasks: int, step: Any, m: Any, params: int) -> dict[str, Any]:
    tool = "mergekit" if step.kind == "mergekit" else "tvq"
    cpu = (m.user_s or 0.0) + (m.sys_s or 0.0) if m.user_s is not None else None
    return {
        "size": size,
        "params": params,
        "tasks": n_tasks,
        "tool": tool,
        "method": step.method,
        "step": step.name,
        "label": step.label,
        "rc": m.rc,
        "wall_s": m.wall_s,
        "cpu_s": cpu,
        "maxrss_mib": m.maxrss_mib,
        "peak_anon_mib": m.peak_anon_mib,
        "other_cpu_cores": m.other_cpu_cores,
        "bytes_on_disk": m.bytes_on_disk,
        "files": m.files,
        "command": shlex.join(step.cmd),
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """tvq / mergekit at the same point: merges against the same method, quantize against TA."""
    for r in rows:
        if r["tool"] != "tvq":
            continue
        method = r["method"] or "task_arithmetic"
        ref = next(
            (x for x in rows if x["tool"] == "mergekit" and x["method"] == method and x["size"] == r["size"] and x["tasks"] == r["tasks"]), None
        )
        ok = ref is not None and ref["rc"] == 0 and r["rc"] == 0
        for key in ("wall_s", "cpu_s", "maxrss_mib", "peak_anon_mib"):
            a, b = r.get(key), ref.get(key) if ref else None
            r[f"{key}_x_mk"] = a / b if ok and a and b else None


def growth(rows: list[dict[str, Any]], size: str, lo: int, hi: int) -> list[dict[str, Any]]:
    """CPU s and wall s at T = hi over T = lo, per series (issue 19: TIES ≤ 5× from 4 to 16 tasks)."""
    out = []
    for tool, method, label in SERIES:
        pick = {r["tasks"]: r for r in rows if r["size"] == size and r["tool"] == tool and r["method"] == method and r["rc"] == 0}
        if lo in pick and hi in pick:
            a, b = pick[lo], pick[hi]
            out.append({"series": label, "cpu_ratio": b["cpu_s"] / a["cpu_s"], "wall_ratio": b["wall_s"] / a["wall_s"], "lo": lo, "hi": hi})
    return out


def summarize(payload: dict[str, Any]) -> None:
    """Ratios to mergekit, and growth from T = 4 to 16 (else from the smallest T to the largest) at the sweep size."""
    add_ratios(payload["rows"])
    tasks = sorted({r["tasks"] for r in payload["rows"] if r["size"] == payload["settings"]["sweep_size"]})
    lo, hi = (4, 16) if 4 in tasks and 16 in tasks else (tasks[0], tasks[-1]) if tasks else (0, 0)
    payload["growth"] = growth(payload["rows"], payload["settings"]["sweep_size"], lo, hi) if lo != hi else []


def _f(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


CELLS = [
    ("wall_s", ".1f"),
    ("cpu_s", ".1f"),
    ("other_cpu_cores", ".2f"),
    ("maxrss_mib", ".0f"),
    ("peak_anon_mib", ".0f"),
    ("cpu_s_x_mk", ".2f"),
    ("wall_s_x_mk", ".2f"),
    ("maxrss_mib_x_mk", ".2f"),
    ("peak_anon_mib_x_mk", ".2f"),
]


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    head = (
        "| size | T | step | wall s | CPU s | others' cores | max RSS MiB | peak anon MiB | CPU ×mk | wall ×mk | RSS ×mk | anon ×mk |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    body = []
    for r in sorted(rows, key=lambda r: (r["params"], r["tasks"], r["tool"] != "tvq", r["method"] is not None, r["method"] or "")):
        label = r["label"] + ("" if r["rc"] == 0 else f" (rc={r['rc']})")
        cells = [r["size"], str(r["tasks"]), label]
        cells += [_f(r.get(key), spec) for key, spec in CELLS]
        body.append("| " + " | ".join(cells) + " |")
    text = [head, *body]
    for g in payload.get("growth", []):
        if g is payload["growth"][0]:
            text += [
                "",
                f"| series ({payload['settings']['sweep_size']}) | CPU s T={g['hi']} / T={g['lo']} | wall s T={g['hi']} / T={g['lo']} |",
                "|---|---:|---:|",
            ]
        text.append(f"| {g['series']} | {g['cpu_ratio']:.2f} | {g['wall_ratio']:.2f} |")
    return "\n".join(text) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r["rc"] == 0]
    st = payload["settings"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    styles = {"tvq": "-", "mergekit": "--"}
    markers = {None: "s", "task_arithmetic": "o", "ties": "^"}
    for col, (key, ylabel) in enumerate((("cpu_s", "CPU seconds (user + sys)"), ("maxrss_mib", "peak memory: max RSS (MiB)"))):
        for row, (xkey, sel) in enumerate((("tasks", lambda r: r["size"] == st["sweep_size"]), ("params", lambda r: r["tasks"] == st["size_tasks"]))):
            ax = axes[row][col]
            for tool, method, label in SERIES:
                pts = sorted((r[xkey], r[key]) for r in rows if sel(r) and r["tool"] == tool and r["method"] == method and r[key])
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot([x / 1e9 for x in xs] if xkey == "params" else xs, ys, styles[tool], marker=markers[method], label=label)
            if xkey == "tasks":
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted({r["tasks"] for r in rows if sel(r)}) or [1])
                ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.set_xlabel(f"number of tasks T (model {st['sweep_size']})")
            else:
                sizes = sorted({r["params"] / 1e9 for r in rows if sel(r)})
                ax.set_xscale("log")
                ax.set_xticks(sizes or [1])
                ax.set_xticklabels([f"{x:.2f}" if x >= 0.01 else f"{x:.1e}" for x in sizes])
                ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xlabel(f"model size (billion parameters, T = {st['size_tasks']})")
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
            ax.get_yaxis().set_major_formatter(plain)
            ax.get_yaxis().set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2.0, 5.0)))
            ax.get_yaxis().set_minor_formatter(plain)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    axes[0][0].set_title("CPU time vs number of tasks")
    axes[0][1].set_title("peak memory vs number of tasks")
    axes[1][0].set_title("CPU time vs model size")
    axes[1][1].set_title("peak memory vs model size")
    fig.suptitle(f"tvq vs mergekit scaling ({payload['date'][:16].replace('T', ' ')} UTC, {payload['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_sizes(text: str) -> tuple[list[str], dict[str, Path]]:
    sizes, dirs = [], {}
    for item in text.split(","):
        name, eq, folder = item.strip().partition("=")
        if name not in PRESETS:
            raise argparse.ArgumentTypeError(f"unknown size {name!r}; presets: {sorted(PRESETS)}")
        sizes.append(name)
        if eq:
            dirs[name] = Path(folder)
    return sizes, dirs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench_scale"), help="families, packs, outputs, results")
    ap.add_argument("--tasks", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8, 16], help="T of the sweep (default 2,4,8,16)")
    ap.add_argument("--sweep-size", choices=sorted(PRESETS), default="0.3B", help="model size of the T sweep")
    ap.add_argument("--sizes", default="0.3B,1.1B", help="sizes at --size-tasks: preset[=MODELS_DIR],... (default 0.3B,1.1B)")
    ap.add_argument("--size-tasks", type=int, default=4, help="T of the size sweep (default 4)")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["task_arithmetic", "ties"], help="task_arithmetic,ties")
    ap.add_argument("--skip-mergekit", action="store_true", help="tvq steps only")
    ap.add_argument("--skip-generate", action="store_true", help="do not make missing model families")
    ap.add_argument("--threads", type=int, default=2, help="tvq --threads (run.py's default)")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every step, both tools (run.py's --env; e.g. PYTHONPATH=SNAPSHOT/src to measure a frozen tvq)",
    )
    ap.add_argument("--keep-packs", action="store_true", help="keep each point's TVQ4 pack")
    ap.add_argument("--out", type=Path, default=None, help="OUT.json / OUT.md / OUT.png (default WORKDIR/scaling)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--report-only", action="store_true", help="measure nothing: rewrite OUT.md and OUT.png from OUT.json")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.workdir = args.workdir.resolve()
    try:
        args.sizes, dirs = parse_sizes(args.sizes)
    except argparse.ArgumentTypeError as err:
        ap.error(str(err))
    if any(not key or not eq for key, eq, _ in (item.partition("=") for item in args.env)):
        ap.error(f"--env {args.env}: expected KEY=VALUE")
    bad = [m for m in args.methods if m not in SHORT]
    if bad:
        ap.error(f"--methods {bad}: choose from {sorted(SHORT)}")
    out = (args.out or args.workdir / "scaling").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        payload = json.loads(out.with_suffix(".json").read_text())
        summarize(payload)
        out.with_suffix(".md").write_text(markdown(payload))
        if not args.no_plot:
            plot(payload, out.with_suffix(".png"))
        print(markdown(payload))
        return 0
    args.family = {size: dirs.get(size, args.workdir / size / "models") for size in {*args.sizes, args.sweep_size}}
    for size, folder in args.family.items():
        need = max([t for s, t in points(args) if s == size])
        if size in dirs:  # an existing family: read only, never generated into
            ensure_family(folder, size, need, generate=False)
        else:
            ensure_family(folder, size, need, generate=not args.skip_generate)
    params = {}
    for size, folder in args.family.items():
        gen = folder / "generation.json"
        params[size] = json.loads(gen.read_text())["params"] if gen.exists() else shape_params(size)

    started = dt.datetime.now(dt.timezone.utc)
    payload: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "machine": llm_run.machine(),
        "settings": {
            "workdir": str(args.workdir),
            "argv": sys.argv if argv is None else ["benchmarks/scaling.py", *argv],
            "sweep_size": args.sweep_size,
            "sizes": args.sizes,
            "size_tasks": args.size_tasks,
            "tasks": args.tasks,
            "methods": args.methods,
            "families": {s: {"models": str(f), "params": params[s]} for s, f in args.family.items()},
            "lambda": llm_run.LAMBDA,
            "density": llm_run.DENSITY,
            "tvq_threads": args.threads,
        },
        "rows": [],
    }

    def save() -> None:
        summarize(payload)
        out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(payload))

    print(f"tvq scaling benchmark — {started:%Y-%m-%d %H:%M} UTC, points {points(args)}", flush=True)
    for size, n_tasks in points(args):
        steps, run_args, pdir = point_steps(args, size, n_tasks)
        env = llm_run.child_environment(run_args)
        payload["settings"].setdefault("child_env", env)
        log_dir = pdir / "logs"
        log_dir.mkdir(exist_ok=True)
        print(f"== {size} ({params[size] / 1e9:.3f}B params), T = {n_tasks}", flush=True)
        for step in steps:
            t0 = time.perf_counter()
            print(f"[{size} T={n_tasks} {step.name}] {step.label}", flush=True)
            m = llm_run.run_step(step, cgroup=None, cache=run_args.cache, log_dir=log_dir, hash_outputs=step.kind != "quantize", env=env)
            payload["rows"].append(record(size, n_tasks, step, m, params[size]) | {"measurement": asdict(m) | {"files": None}})
            if step.kind != "quantize":
                shutil.rmtree(step.output, ignore_errors=True)  # merged models: hashed, then deleted
            save()
            print(f"    ({time.perf_counter() - t0:.0f} s with cache warming and hashing)", flush=True)
        if not args.keep_packs:
            shutil.rmtree(pdir / "packs", ignore_errors=True)
    save()
    if not args.no_plot:
        plot(payload, out.with_suffix(".png"))
    print(markdown(payload))
    print(f"wrote {out.with_suffix('.json')}, .md" + ("" if args.no_plot else ", .png"), flush=True)
    return 0 if all(r["rc"] == 0 for r in payload["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
