"""Quantize's memory against the number of tasks (issue 19): peak anonymous memory, wall and CPU
seconds of ``tvq quantize`` for T = 4, 8, 16, ... tasks of one model family, each run a fresh
child process; with ``--reference-src DIR`` (e.g. ``git archive`` of an older commit's ``src``)
the same runs on that code too, back to back, and the two packs' data files compared by sha256.

Tasks beyond the family's own fine-tunes reuse them round-robin under new names (``t0``, ``t1``,
...): the arithmetic, codes and memory are those of distinct tasks; only the page cache is shared.

Usage::

    python benchmarks/quantize_memory.py --models /work/bench_llm/models --tasks 4,8,16 --scheme tvq4 \\
        --reference-src /tmp/head/src
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
SCHEMES = {
    "tvq4": ["--bits", "4"],
    "tvq2": ["--bits", "2"],
    "rtvq": ["--bits", "2", "--base-bits", "3", "--residual", "--error-correction"],
}


def _llm_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tvq_bench_llm_run", HERE / "llm" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tvq_bench_llm_run"] = module
    spec.loader.exec_module(module)
    return module


def fine_tunes(models: Path) -> list[Path]:
    found = sorted(p for p in models.iterdir() if p.is_dir() and p.name.startswith("ft"))
    if not found:
        raise SystemExit(f"{models}: no ft* folders (make a family with benchmarks/llm/make_models.py)")
    return found


def data_digests(pack: Path) -> dict[str, str]:
    out = {}
    for path in sorted(pack.rglob("*.safetensors")):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        out[path.relative_to(pack).as_posix()] = h.hexdigest()
    return out


def run(models: Path, n_tasks: int, scheme: str, out: Path, src: Path | None, threads: int) -> dict[str, float]:
    """One ``tvq quantize`` child: wall s, CPU s (user + sys of the child tree), peak anon MiB."""
    poller_cls = _llm_run().TreePoller
    fts = fine_tunes(models)
    args = [arg for t in range(n_tasks) for arg in ("--finetuned", f"t{t}={fts[t % len(fts)]}")]
    code = "import sys; from tvq.cli import main; sys.argv[0] = 'tvq'; main()"
    cmd = [sys.executable, "-c", code, "quantize", "--pretrained", str(models / "base"), *args, "--out", str(out), *SCHEMES[scheme],
           "--threads", str(threads), "--no-progress"]  # fmt: skip
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    poller = poller_cls(child.pid)
    poller.start()
    rc = child.wait()
    poller.stop()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"tvq quantize exited {rc} (T={n_tasks}, src={src or 'installed'})")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_anon_mib": poller.peak_anon / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="a family folder: base/ and ft*/ (benchmarks/llm/make_models.py)")
    parser.add_argument("--tasks", default="4,8,16", help="comma-separated task counts")
    parser.add_argument("--scheme", choices=sorted(SCHEMES), default="tvq4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-src", type=Path, help="another tvq's src folder, run beside the installed one")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tvq-quantize-memory"))
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.tasks.split(",")]
    codes: list[tuple[str, Path | None]] = [("this tvq", None)] + ([("reference", args.reference_src)] if args.reference_src else [])
    rows = []
    for n_tasks in counts:
        digests = {}
        for label, src in codes:
            out = args.workdir / f"{label.replace(' ', '_')}-{n_tasks}"
            shutil.rmtree(out, ignore_errors=True)
            m = run(args.models, n_tasks, args.scheme, out, src, args.threads)
            digests[label] = data_digests(out)
            shutil.rmtree(out, ignore_errors=True)
            rows.append((n_tasks, label, m))
            print(f"T={n_tasks} {label}: wall {m['wall_s']:.1f} s, CPU {m['cpu_s']:.1f} s, peak anon {m['peak_anon_mib']:.0f} MiB", flush=True)
        if len(digests) == 2:
            same = digests["this tvq"] == digests["reference"]
            print(f"T={n_tasks}: data files {'identical' if same else 'DIFFER'} ({len(digests['this tvq'])} files)", flush=True)
    print("\n| T | code | wall s | CPU s | peak anon MiB |\n|---:|---|---:|---:|---:|")
    for n_tasks, label, m in rows:
        print(f"| {n_tasks} | {label} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {m['peak_anon_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
