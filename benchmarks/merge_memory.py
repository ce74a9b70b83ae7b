"""Peak memory and time of a merge with one large tensor: whole-tensor path vs block streaming.

Makes a synthetic model locally (one ``rows × cols`` bf16 matrix, like a vocabulary embedding,
plus a small bias), ``--tasks`` bf16 fine-tunes of it and a TVQ 4-bit pack of them, then merges
each input (pack, checkpoints) with each method twice in the same run, each merge in a fresh
child process: the old path (every tensor merged whole: ``BLOCK_ELEMENTS`` above the tensor)
and the new one (``tvq.merge.blocks``). Peak memory is the child's peak resident set
(``VmHWM``, file-backed pages of mapped inputs included) less that of a child that only
imports tvq and opens the inputs; the output files' sha256 must match. A method takes options
after a colon (``ties:scope=tensor+tie_rule=keep_ties``); ``task=NAME`` is the per-task methods'
task (``emr:task=t0``: that task's model; plain ``emr`` writes the unified pack); ``--tasks
2,4,8,16`` merges the first T tasks of the same inputs for each T (time against T). TIES merges
whole below ``ties.WHOLE_TENSOR_BYTES`` on both paths unless ``--ties-whole-bytes 0``::

    python benchmarks/merge_memory.py                         # 67 M parameters (8192 × 8192) × 8 tasks
    python benchmarks/merge_memory.py --rows 32768 --cols 8192 --tasks 8 --inputs pack
    python benchmarks/merge_memory.py --methods ties,ties:scope=tensor --inputs pack,checkpoints
    python benchmarks/merge_memory.py --methods ties:scope=tensor --tasks 2,4,8,16 --inputs pack --repeat 1
    python benchmarks/merge_memory.py --rows 4096 --methods emr,emr:task=t0,consensus,consensus:base=ties,magmax,lines,dare
    python benchmarks/merge_memory.py --rows 131072 --cols 8192 --tasks 8 --inputs pack --new-only --repeat 1   # 1.07 B parameters
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import tvq.merge.blocks as blocks_module
import tvq.merge.methods.ties as ties_module
from tvq import QuantizeOptions, quantize
from tvq.io.safetensors_writer import sha256_file
from tvq.merge import load_task_vectors, merge

WHOLE = 1 << 62


def make_inputs(root: Path, rows: int, cols: int, tasks: int) -> tuple[Path, dict[str, Path], Path]:
    """θ_pre and ``tasks`` fine-tunes (bf16 safetensors) and a TVQ4 pack of them, made once."""
    pre_path, pack = root / "pre.safetensors", root / "tvq4"
    fts = {f"t{i}": root / f"t{i}.safetensors" for i in range(tasks)}
    if pack.is_dir() and all(p.is_file() for p in fts.values()):
        return pre_path, fts, pack
    g = torch.Generator().manual_seed(0)
    pre = {"embed.weight": torch.randn(rows, cols, generator=g).bfloat16(), "bias": torch.zeros(cols, dtype=torch.bfloat16)}
    save_file(pre, pre_path)
    for i, path in enumerate(fts.values()):
        g.manual_seed(100 + i)
        save_file({k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in pre.items()}, path)
    del pre
    quantize(pre_path, fts, pack, QuantizeOptions(bits=4), progress=False)
    return pre_path, fts, pack


def child(args: argparse.Namespace) -> None:
    """One merge (or none, ``--method none``: the baseline) in this process; prints JSON."""
    blocks_module.BLOCK_ELEMENTS = args.block
    if args.ties_whole_bytes is not None:
        ties_module.WHOLE_TENSOR_BYTES = args.ties_whole_bytes
    spec = json.loads(args.spec)
    reader, vectors = load_task_vectors(spec["pre"], packs=spec.get("packs", []), finetuned=spec.get("finetuned"))
    vectors = vectors.select(list(vectors)[: spec["tasks"]])
    start = time.perf_counter()
    if args.method != "none":
        name, options = method_spec(args.method)
        task = options.pop("task", None)
        merge(name, reader, vectors, args.out, options, task=None if task is None else str(task), overwrite=True)
    seconds = time.perf_counter() - start
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rss_kib": peak_rss_kib(), "seconds": seconds, "cpu": cpu.ru_utime + cpu.ru_stime}))


def method_spec(text: str) -> tuple[str, dict[str, object]]:
    """``ties:scope=tensor+density=0.1`` -> ("ties", {"scope": "tensor", "density": 0.1})."""
    name, _, rest = text.partition(":")
    options: dict[str, object] = {}
    for item in filter(None, rest.split("+")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def peak_rss_kib() -> int:
    """This process's resident-set high-water mark (``VmHWM``: unlike ``ru_maxrss``, not
    inherited from the parent's across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_child(spec: dict, method: str, block: int, out: Path, ties_whole_bytes: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--spec", json.dumps(spec), "--method", method, "--block", str(block), "--out", str(out)]
    if ties_whole_bytes is not None:
        cmd += ["--ties-whole-bytes", str(ties_whole_bytes)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{method} (block {block}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=8192)
    p.add_argument("--tasks", default="8", help="tasks merged (inputs are made for the largest); several: 2,4,8,16")
    p.add_argument("--methods", default="task_arithmetic,average")
    p.add_argument("--inputs", default="pack,checkpoints", help="pack, checkpoints or both")
    p.add_argument("--repeat", type=int, default=3, help="runs of each merge (the fastest is shown)")
    p.add_argument("--block-elements", type=int, default=blocks_module.BLOCK_ELEMENTS, help="elements per block of the new path")
    p.add_argument("--ties-whole-bytes", type=int, default=None, help="ties.WHOLE_TENSOR_BYTES in the children (0: every large tensor streams)")
    p.add_argument("--new-only", action="store_true", help="skip the whole-tensor path (a 1 B-parameter tensor × 8 tasks does not fit it)")
    p.add_argument("--workdir", type=Path, default=None, help="where the inputs are made (kept; default: a temporary folder)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--block", type=int, default=blocks_module.BLOCK_ELEMENTS, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        made = time.perf_counter()
        counts = [int(t) for t in args.tasks.split(",")]
        pre, fts, pack = make_inputs(root, args.rows, args.cols, max(counts))
        params = args.rows * args.cols
        print(f"{params / 1e6:.0f} M-parameter tensor × {args.tasks} tasks; inputs ready in {time.perf_counter() - made:.0f} s")
        specs: dict[str, dict] = {"pack": {"pre": str(pre), "packs": [str(pack)]},
                 "checkpoints": {"pre": str(pre), "finetuned": {k: str(v) for k, v in fts.items()}}}  # fmt: skip
        header = (f"{'input':<12} {'T':>3} {'method':<28} {'old MiB':>9} {'new MiB':>9} {'mem ratio':>9} {'old s':>7} {'new s':>7} "
                  f"{'t ratio':>7}  same")  # fmt: skip
        print(header)
        print("-" * len(header))
        for name, tasks in ((n, t) for n in args.inputs.split(",") for t in counts):
            spec = {**specs[name], "tasks": tasks}
            base = run_child(spec, "none", WHOLE, root / "none.safetensors")["rss_kib"] / 1024
            for method in args.methods.split(","):
                out_old, out_new = root / "old.safetensors", root / "new.safetensors"
                old, new = {"rss_kib": 0, "seconds": float("inf")}, {"rss_kib": 0, "seconds": float("inf")}
                for _ in range(args.repeat):  # alternated; the fastest run of each, the largest peak
                    paths = ((old, WHOLE, out_old), (new, args.block_elements, out_new))
                    for best, block, out in paths[1:] if args.new_only else paths:
                        got = run_child(spec, method, block, out, args.ties_whole_bytes)
                        best.update(rss_kib=max(best["rss_kib"], got["rss_kib"]), seconds=min(best["seconds"], got["seconds"]))
                same = "—" if args.new_only else sha256_file(out_old) == sha256_file(out_new)
                old_mib, new_mib = old["rss_kib"] / 1024 - base, new["rss_kib"] / 1024 - base
                if args.new_only:
                    print(f"{name:<12} {tasks:>3} {method:<28} {'—':>9} {new_mib:>9.0f} {'—':>9} {'—':>7} {new['seconds']:>7.1f} {'—':>7}  —")
                    out_new.unlink()
                    continue
                print(f"{name:<12} {tasks:>3} {method:<28} {old_mib:>9.0f} {new_mib:>9.0f} {new_mib / max(old_mib, 1.0):>9.3f} "
                      f"{old['seconds']:>7.1f} {new['seconds']:>7.1f} {new['seconds'] / old['seconds']:>7.2f}  {same}")  # fmt: skip
                out_old.unlink()
                out_new.unlink()
            print(f"{'':<12} (baseline: {base:.0f} MiB for importing tvq and opening the inputs, subtracted)")


if __name__ == "__main__":
    main()
