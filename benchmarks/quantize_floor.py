"""How far is ``tvq quantize`` from the physical limit? Five measurements in one run.

On a checkpoint family (θ_pre and fine-tunes as safetensors folders, e.g. the LLM benchmark's
``python benchmarks/llm/make_models.py``), with the page cache warm (every input read once
first):

* **read**: every input file read once into a buffer (the I/O floor, wall time);
* **minimal**: the least code that makes the same codes: per tensor, θ_pre in fp32 once, then
  for each task τ_t = θ_t − θ_pre, its min and max, the codes and their bit packing, in one
  thread (torch's own ops; no hashing, no error statistics, no checks, nothing written);
* **kernels**: the same codes by tvq's own compiled kernels (tvq.quant.kernels), one thread,
  nothing else: the arithmetic's own floor, which ``--threads`` can divide;
* **start**: starting the interpreter, importing ``tvq.cli`` and torch and loading the kernels,
  which every ``tvq quantize`` pays once;
* **tvq**: ``tvq quantize`` itself (a child process, ``--threads``), every pack file written,
  inputs and outputs hashed, statistics and checks included; with ``--reference`` also on the
  torch path (``TVQ_QUANT_KERNEL=torch``, before the compiled kernels of tvq.quant.kernels),
  back to back, and the two packs' data files compared byte for byte.

Issue 19's targets: tvq's CPU time ≤ 1.3× minimal's + read's, tvq's wall ≤ 2× read's; the last
column says how far start-up plus the kernels alone, spread over ``--threads``, already are from
the read (the wall target cannot be met where that is above 2). CPU
seconds are user + system time (``getrusage``); the machine may be shared, so the ratios (same
run, back to back) are what to read::

    python benchmarks/quantize_floor.py --models /work/bench_llm/models --tasks 4 --schemes tvq4,tvq2,rtvq --reference
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from tvq.io.readers import open_checkpoint
from tvq.quant import kernels
from tvq.quant.affine import QuantSpec, params_from_range, quantize_into
from tvq.quant.packing import pack_float_codes, packed_nbytes

SCHEMES = {
    "tvq4": ["--bits", "4"],
    "tvq2": ["--bits", "2"],
    "rtvq": ["--residual", "--base-bits", "3", "--bits", "2", "--error-correction"],
}
READ_CHUNK = 64 << 20


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def measured(fn: Callable[[], object], who: int = resource.RUSAGE_SELF) -> tuple[float, float]:
    """(wall s, CPU s) of ``fn``."""
    wall, cpu = time.perf_counter(), cpu_seconds(who)
    fn()
    return time.perf_counter() - wall, cpu_seconds(who) - cpu


def input_files(folders: list[Path]) -> list[Path]:
    return [f for d in folders for f in sorted(d.glob("*.safetensors"))]


def read_all(files: list[Path]) -> int:
    """Every file's bytes into one reused buffer (the kernel copies them from the page cache)."""
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def matrices(pre_dir: Path, ft_dirs: list[Path]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(θ_pre, every θ_t) of each float tensor of two or more dimensions, as stored."""
    pre = open_checkpoint(pre_dir)
    fts = [open_checkpoint(d) for d in ft_dirs]
    for key in pre.keys():  # noqa: SIM118 -- a reader, not a dict
        if pre.meta(key).is_float and len(pre.meta(key).shape) >= 2:
            yield pre.get(key), [ft.get(key) for ft in fts]


def minimal(pre_dir: Path, ft_dirs: list[Path], bits: int) -> int:
    """Per-tensor min–max TVQ of every float tensor at ``bits``, one thread, torch ops only."""
    written = 0
    for pre, thetas in matrices(pre_dir, ft_dirs):
        base = pre.float().reshape(-1)
        tau = torch.empty_like(base)
        q = torch.empty_like(base)
        for theta in thetas:
            torch.sub(theta.reshape(-1), base, out=tau)  # bf16 - fp32 promotes exactly
            lo, hi = torch.aminmax(tau)
            if float(lo) == float(hi):
                continue
            qp = params_from_range(lo, hi, bits)
            out = torch.empty(packed_nbytes(tau.numel(), bits), dtype=torch.uint8)
            pack_float_codes(quantize_into(tau, qp, q), bits, out)
            written += out.numel()
    return written


def kernels_only(pre_dir: Path, ft_dirs: list[Path], bits: int) -> int:
    """tvq's own compiled min–max kernels (tvq.quant.kernels: range pass, then quantize and pack,
    every task of a tensor at once), one thread, on the tensors ``minimal`` quantizes: what the
    arithmetic of ``tvq quantize`` costs with nothing around it (no statistics, hashing, entropy
    coding or writing); tensors the kernels do not take are skipped."""
    written = 0
    for pre, thetas in matrices(pre_dir, ft_dirs):
        results = kernels.encode_minmax(thetas, pre, QuantSpec(bits), stats=False)
        written += sum(r.packed.numel() for r in results or () if r.packed is not None)
    return written


STARTUP = "import tvq.cli, torch; from tvq.quant import kernels; kernels.compiled()"


def startup() -> float:
    """Wall seconds of starting the interpreter, importing tvq's command line and torch, and
    loading the compiled kernels: what any ``tvq quantize`` pays before its first tensor."""
    wall, _ = measured(lambda: subprocess.run([sys.executable, "-c", STARTUP], check=True))
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("/work/bench_llm/models"), help="base/ and ft0/ … ft{N-1}/")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--schemes", default="tvq4,tvq2,rtvq")
    p.add_argument("--threads", type=int, default=2, help="tvq quantize --threads")
    p.add_argument("--tvq", default=str(Path(sys.executable).with_name("tvq")), help="the tvq command")
    p.add_argument("--reference", action="store_true", help="also run tvq on the torch path and compare the packs")
    args = p.parse_args()
    torch.set_num_threads(1)
    pre_dir, ft_dirs = args.models / "base", [args.models / f"ft{i}" for i in range(args.tasks)]
    files = input_files([pre_dir, *ft_dirs])
    size = read_all(files)  # warm the page cache
    read_wall, read_cpu = measured(lambda: read_all(files))
    print(f"inputs: {len(files)} files, {size / 2**30:.2f} GiB; read once: {read_wall:.2f} s wall, {read_cpu:.2f} s CPU")
    kernels.compiled()  # loaded (or compiled) before anything is timed
    start = min(startup() for _ in range(3))
    print(f"start-up ({STARTUP}): {start:.2f} s wall (best of 3)")
    rows = []
    for scheme in args.schemes.split(","):
        bits = int(SCHEMES[scheme][SCHEMES[scheme].index("--bits") + 1])
        min_wall, min_cpu = measured(lambda bits=bits: minimal(pre_dir, ft_dirs, bits))
        _, kernel_cpu = measured(lambda bits=bits: kernels_only(pre_dir, ft_dirs, bits))
        work = Path(tempfile.mkdtemp(prefix="tvq-floor-"))
        try:
            runs = {path: run_tvq(args, pre_dir, ft_dirs, scheme, work / path, path) for path in (["torch"] if args.reference else []) + ["numba"]}
            if args.reference:
                same = same_data(work / "torch", work / "numba")
                print(f"{scheme}: pack data files byte-identical to the torch path's: {same}", flush=True)
        finally:
            shutil.rmtree(work)
        floor = min_cpu + read_cpu
        for path, (tvq_wall, tvq_cpu) in runs.items():
            compute = start + kernel_cpu / args.threads  # start-up, then the kernels alone on every thread
            rows.append((f"{scheme} ({path})", min_cpu, kernel_cpu, tvq_cpu, tvq_cpu / floor, tvq_wall, tvq_wall / read_wall, compute / read_wall))
            print(rows[-1], flush=True)
    print(f"\n| scheme (path) | minimal CPU s (1 thread; RTVQ: its 2-bit offsets alone) | kernels CPU s (1 thread) | tvq CPU s "
          f"| tvq CPU / (minimal + read) | tvq wall s (--threads {args.threads}) | tvq wall / read wall ({read_wall:.2f} s) "
          f"| (start {start:.2f} s + kernels / {args.threads}) / read wall |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for scheme, *seconds, ratio, tvq_wall, wall_ratio, floor_ratio in rows:
        print(f"| {scheme} | {' | '.join(f'{s:.1f}' for s in seconds)} | {ratio:.2f} | {tvq_wall:.1f} | {wall_ratio:.1f} | {floor_ratio:.1f} |")


def run_tvq(args: argparse.Namespace, pre_dir: Path, ft_dirs: list[Path], scheme: str, out: Path, path: str) -> tuple[float, float]:
    """(wall s, CPU s) of one ``tvq quantize``, on the compiled kernels ("numba") or the torch path."""
    cmd = [args.tvq, "quantize", "-p", str(pre_dir), *(a for i, d in enumerate(ft_dirs) for a in ("-f", f"t{i}={d}")),
           *SCHEMES[scheme], "-o", str(out), "--threads", str(args.threads), "--no-progress"]  # fmt: skip
    env = {**os.environ, "TVQ_QUANT_KERNEL": path}
    return measured(lambda: subprocess.run(cmd, check=True, capture_output=True, env=env), resource.RUSAGE_CHILDREN)


def same_data(a: Path, b: Path) -> bool:
    """Whether two packs hold the same data files, byte for byte (manifests differ in statistics)."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    return files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors")) and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


if __name__ == "__main__":
    main()
