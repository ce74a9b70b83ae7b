"""Where does ``tvq quantize`` spend its time? Two complementary views.

``stages``  (default) replays tvq's per-tensor encode path (``tvq.encode.key.encode_key``) on a
            sample of the model's tensors, stage by stage, with tvq's own functions, and
            extrapolates to the whole model by element count: read (safetensors), NaN/Inf
            check, input sha256, bf16→fp32, τ = θ_t − θ_pre, min/max, rounding (codes),
            bit packing, dequantize (reconstruction), error sums (fp64), output sha256.
            It also times candidate replacements (fused / in-place / lower-precision
            variants) on the same data, so the suggested optimizations come with numbers.
``pyspy``   runs the real ``tvq quantize`` under py-spy (sampling, ``--rate`` Hz) and
            aggregates the samples by tvq function and by source line.

Usage::

    python benchmarks/llm/profile_quantize.py stages --workdir /work/bench_llm --bits 4
    python benchmarks/llm/profile_quantize.py pyspy  --workdir /work/bench_llm --bits 4
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- stages


class Timer:
    def __init__(self) -> None:
        self.total: dict[str, float] = collections.defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.total[name] += time.perf_counter() - t0


def sample_keys(keys: list[str], layers: list[int]) -> list[str]:
    """Whole layers (all projections) plus embeddings/lm_head: representative of the mix."""
    chosen = [k for k in keys if any(f"layers.{i}." in k for i in layers)]
    chosen += [k for k in keys if "layers." not in k]
    return chosen


def profile_stages(workdir: Path, bits: int, tasks: int, layers: list[int], repeats: int) -> dict:
    from tvq.encode.job import tensor_digest
    from tvq.io.readers import open_checkpoint
    from tvq.io.safetensors_writer import tensor_bytes
    from tvq.quant.affine import minmax_dequantize, minmax_params, minmax_quantize
    from tvq.quant.packing import pack_codes

    models = workdir / "models"
    pre = open_checkpoint(models / "base")
    fts = [open_checkpoint(models / f"ft{t}") for t in range(tasks)]
    keys = sample_keys(sorted(pre.keys()), layers)
    total_elems = sum(pre.meta(k).numel for k in pre.keys())  # noqa: SIM118 (a reader, not a dict)
    sample_elems = sum(pre.meta(k).numel for k in keys)
    tm = Timer()
    alt = Timer()
    for _ in range(repeats):
        for key in keys:
            with tm("read (safetensors get_tensor)"):
                theta_pre = pre.get(key)
                raw = [r.get(key) for r in fts]
            with tm("NaN/Inf check (isfinite)"):
                for t in (theta_pre, *raw):
                    bool(torch.isfinite(t).all())
            with tm("sha256 of inputs"):
                tensor_digest(key, theta_pre)
                for t in raw:
                    tensor_digest(key, t)
            with tm("bf16→fp32"):
                pre32 = theta_pre.float()
                f32 = [t.float() for t in raw]
            if theta_pre.dim() < 2:
                continue  # kept raw: nothing else to do
            for t32 in f32:
                with tm("τ = θ_t − θ_pre (fp32 sub)"):
                    tau = t32 - pre32
                with tm("min/max → scale, zero point"):
                    p = minmax_params(tau, bits)
                if p.constant is not None:
                    continue
                with tm("rounding to codes (mul, add, round, clamp, →u8)"):
                    codes = minmax_quantize(tau, p)
                with tm("bit packing (pack_codes)"):
                    packed = pack_codes(codes, bits)
                with tm("dequantize (reconstruction)"):
                    recon = minmax_dequantize(codes, p, tuple(tau.shape))
                with tm("error sums in fp64 (|τ̂−τ|², |τ|²)"):
                    float((recon - tau).double().pow(2).sum())
                    float(tau.double().pow(2).sum())
                with tm("sha256 of packed output (writer + manifest)"):
                    hashlib.sha256(tensor_bytes(packed)).hexdigest()
                # --- candidate replacements, same data ---
                with alt("bf16→fp32 into a reused buffer (copy_)"):
                    buf = torch.empty(raw[0].shape, dtype=torch.float32)
                    buf.copy_(raw[0])
                with alt("min/max via torch.aminmax"):
                    torch.aminmax(tau)
                with alt("rounding in place (mul_, add_, round_, clamp_) →u8"):
                    scratch = tau.clone()
                    scratch.mul_(p.scale).add_(p.zero_point).round_().clamp_(0, 2**bits - 1)
                    scratch.to(torch.uint8)
                with alt("rounding (clone only, baseline for the line above)"):
                    tau.clone()
                with alt("bit packing, 4/2-bit via uint8 shifts/ors"):
                    _pack_u8(codes, bits)
                with alt("error sums fp32 (torch.linalg.vector_norm)"):
                    d = recon.sub_(tau)
                    float(torch.linalg.vector_norm(d))
                    float(torch.linalg.vector_norm(tau))
                del tau, codes, packed, recon
    scale = total_elems / sample_elems / repeats
    stages = {k: v * scale for k, v in tm.total.items()}
    alts = {k: v * scale for k, v in alt.total.items()}
    return {
        "bits": bits,
        "tasks": tasks,
        "sample_keys": len(keys),
        "sample_elements": sample_elems,
        "model_elements": total_elems,
        "extrapolated_s": stages,
        "extrapolated_total_s": sum(stages.values()),
        "alternatives_s": alts,
    }


def _pack_u8(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Candidate: pack 8/bits codes per byte with uint8 shifts (no int64 temporaries)."""
    per = 8 // bits
    n = codes.numel()
    pad = (-n) % per
    c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    c = c.view(-1, per)
    out = c[:, 0].clone()
    for j in range(1, per):
        out |= c[:, j] << (j * bits)
    return out


def print_stages(result: dict) -> None:
    total = result["extrapolated_total_s"]
    print(
        f"\nTVQ {result['bits']}-bit encode path, {result['tasks']} tasks: sampled {result['sample_keys']} tensors "
        f"({result['sample_elements'] / 1e6:.0f} M of {result['model_elements'] / 1e6:.0f} M elements), "
        "extrapolated to the whole model (single process):\n"
    )
    print("| stage | s (whole model) | share |\n|---|---:|---:|")
    for k, v in sorted(result["extrapolated_s"].items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.1f} | {100 * v / total:.1f}% |")
    print(f"| **total** | **{total:.1f}** | 100% |")
    print("\ncandidate replacements (same data, whole-model extrapolation):\n")
    print("| variant | s |\n|---|---:|")
    for k, v in result["alternatives_s"].items():
        print(f"| {k} | {v:.1f} |")


# ----------------------------------------------------------------------------- py-spy


def profile_pyspy(workdir: Path, bits: int, tasks: int, rate: int, out_dir: Path) -> dict:
    models = workdir / "models"
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"pyspy-tvq{bits}.txt"
    pack = workdir / "profile" / f"pack-tvq{bits}"
    cmd = [
        pyspy, "record", "--rate", str(rate), "--format", "raw", "-o", str(raw), "--",
        shutil.which("tvq") or "tvq", "quantize", "-p", str(models / "base"),
        *(a for t in range(tasks) for a in ("-f", f"ft{t}={models / f'ft{t}'}")),
        "--bits", str(bits), "-o", str(pack), "--overwrite", "--no-progress",
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, **aggregate_raw(raw)}


def aggregate_raw(raw: Path) -> dict:
    """Collapsed stacks → samples by innermost tvq function and by innermost tvq line."""
    by_func: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        tvq_frames = [f for f in frames if "tvq/" in f or "tvq\\" in f]
        inner = tvq_frames[-1] if tvq_frames else frames[-1]
        # frame format: "func (path/file.py:LINE)"
        func = inner.split(" (")[0]
        file_line = inner[inner.find("(") + 1 : inner.rfind(")")]
        short = file_line.split("tvq/")[-1]
        by_func[f"{func} ({short.split(':')[0]})"] += n
        by_line[short] += n
        by_leaf[frames[-1].split(" (")[0]] += n
    return {
        "samples": total,
        "by_function": dict(by_func.most_common(25)),
        "by_line": dict(by_line.most_common(40)),
        "by_leaf_frame": dict(by_leaf.most_common(15)),
    }


def print_pyspy(result: dict) -> None:
    total = result["samples"] or 1
    print(f"\npy-spy: {result['samples']} samples, wall {result.get('wall_s', math.nan):.0f} s\n")
    print("| innermost tvq function | share |\n|---|---:|")
    for k, v in result["by_function"].items():
        print(f"| {k} | {100 * v / total:.1f}% |")
    print("\n| innermost tvq line | share |\n|---|---:|")
    for k, v in list(result["by_line"].items())[:25]:
        print(f"| {k} | {100 * v / total:.1f}% |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["stages", "pyspy", "aggregate"], nargs="?", default="stages")
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench_llm"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 11, 21], help="stages: layers sampled")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rate", type=int, default=20, help="pyspy: samples per second")
    ap.add_argument("--raw", type=Path, help="aggregate: an existing py-spy raw file")
    args = ap.parse_args(argv)
    out_dir = args.workdir / "profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    if args.mode == "stages":
        result = profile_stages(args.workdir, args.bits, args.tasks, args.layers, args.repeats)
        print_stages(result)
    elif args.mode == "pyspy":
        result = profile_pyspy(args.workdir, args.bits, args.tasks, args.rate, out_dir)
        print_pyspy(result)
    else:
        result = aggregate_raw(args.raw)
        print_pyspy(result)
    (out_dir / f"{args.mode}-tvq{args.bits}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
