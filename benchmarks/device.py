"""``--device cuda`` against the CPU, in one run: the same bytes, and how much faster.

Makes a Llama-shaped bf16 family locally (``--layers`` blocks of hidden 2048 / MLP 5632 /
vocabulary 32000, TinyLlama's widths; 8 layers = 0.48 B parameters) with ``--tasks``
fine-tunes, then

* quantizes it (TVQ 4-bit, TVQ 2-bit, RTVQ B3O2+EC) on the CPU and on the device: the pack
  files (codes, scales, entropy-coded frames) must be byte-identical; the manifests may differ
  only in the error statistics (``rel_error``: reductions sum in another order), whose largest
  relative difference is printed;
* merges from the TVQ 4-bit and RTVQ packs with every method that merges by blocks, on the
  CPU and on the device (``MergeMethod.on_device`` forced on, to find which methods can):
  the merged files must be byte-identical. ``--methods`` takes options after a colon, as
  ``merge_memory.py`` does (``ties:scope=tensor+tie_rule=keep_ties``).

Each step is timed (wall, the device synchronised) on the same machine in the same process.
Needs a CUDA device; prints a markdown table and writes ``device.json`` under ``--out``::

    python benchmarks/device.py --layers 8 --tasks 4 --out /tmp/device-bench
    python benchmarks/device.py --layers 1 --tasks 4 --small   # correctness only, seconds
    python benchmarks/device.py --methods ties,ties:scope=tensor,consensus:base=ties --schemes tvq4
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from merge_memory import method_spec  # benchmarks/ is the script's own folder
from safetensors.torch import save_file

from tvq import QuantizeOptions, quantize
from tvq.execute import LocalExecutor
from tvq.io.safetensors_writer import sha256_file
from tvq.merge import load_task_vectors, merge
from tvq.merge.registry import MergeMethod, available_methods

SCHEMES: dict[str, QuantizeOptions] = {
    "tvq4": QuantizeOptions(bits=4),
    "tvq2": QuantizeOptions(bits=2),
    "rtvq-b3o2-ec": QuantizeOptions(bits=2, residual=True, base_bits=3, error_correction=True),
}


def shapes(layers: int, small: bool) -> dict[str, tuple[int, ...]]:
    """TinyLlama's tensor shapes (``small``: every width / 8)."""
    d, ff, vocab, kv = (256, 704, 4000, 32) if small else (2048, 5632, 32000, 256)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d), "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, d), p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                p + "mlp.down_proj.weight": (d, ff), p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}  # fmt: skip
    return out


def make_family(root: Path, layers: int, tasks: int, small: bool) -> tuple[Path, dict[str, Path], int]:
    """θ_pre (std 0.02, norms near 1) and ``tasks`` fine-tunes (+ N(0, (0.02·rel)²), rel per task), bf16."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    pre = {k: (1 + 0.05 * torch.randn(s, generator=g) if len(s) == 1 else 0.02 * torch.randn(s, generator=g)).bfloat16()
           for k, s in shapes(layers, small).items()}  # fmt: skip
    save_file(pre, root / "pre.safetensors")
    fts = {}
    for t in range(tasks):
        g.manual_seed(100 + t)
        rel = 0.005 * (1 + t)
        fts[f"t{t}"] = root / f"t{t}.safetensors"
        save_file({k: (v.float() + 0.02 * rel * torch.randn(v.shape, generator=g)).bfloat16() for k, v in pre.items()}, fts[f"t{t}"])
    return root / "pre.safetensors", fts, sum(v.numel() for v in pre.values())


def timed(fn: Callable[[], object], device: str) -> float:
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def pack_identity(a: Path, b: Path) -> tuple[bool, float]:
    """(every file but the manifest and card byte-identical and the manifests equal without the
    error statistics, the largest relative difference of those statistics)."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    same = bool(files) and all(sha256_file(a / f) == sha256_file(b / f) for f in files)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    worst = 0.0
    for ta, tb in zip(ma["tasks"], mb["tasks"], strict=True):
        for field in ("rel_error", "rel_error_quantized"):
            x, y = ta.pop(field, None), tb.pop(field, None)
            if x is not None and y is not None:
                worst = max(worst, abs(x - y) / max(abs(x), 1e-30))
    for m in (ma, mb):
        m.pop("digest", None)  # of the manifest's text, statistics included
        m.pop("created_by", None)
        for entry in (m.get("pretrained") or {}, *m["tasks"]):
            entry.pop("path", None)
    return same and ma == mb, worst


def merge_methods() -> list[str]:
    """Every method that merges large tensors by blocks (the path ``--device`` moves)."""
    out = []
    for name, cls in available_methods().items():
        if cls.per_task or name.startswith("adamerging"):
            continue
        if cls.elementwise or cls.merges_by_blocks is not MergeMethod.merges_by_blocks:
            out.append(name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--small", action="store_true", help="every width / 8 (correctness in seconds)")
    p.add_argument("--threads", type=int, default=8, help="tensors encoded/merged concurrently (both devices)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--merge-packs", default="tvq4,rtvq-b3o2-ec", help="packs merged from")
    p.add_argument("--methods", default=None, help="default: every method that merges by blocks")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tvq-device"))
    p.add_argument("--out", type=Path, default=Path("/tmp/tvq-device/out"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.workdir / "packs", ignore_errors=True)
    shutil.rmtree(args.workdir / "merged", ignore_errors=True)
    t0 = time.perf_counter()
    pre, fts, params = make_family(args.workdir / "models", args.layers, args.tasks, args.small)
    where = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    print(f"family: {params / 1e9:.3f} B parameters × {args.tasks} tasks, made in {time.perf_counter() - t0:.1f} s; {where}")
    executor = LocalExecutor(args.threads)
    dev = args.device
    rows: list[dict] = []
    warm = args.workdir / "packs" / "warm"  # CUDA context and kernels, before anything is timed
    quantize(pre, {"t0": fts["t0"]}, warm, SCHEMES["tvq4"], progress=False, device=dev)

    def quantized(scheme: str, device: str, tag: str) -> tuple[Path, float]:
        path = args.workdir / "packs" / f"{scheme}-{tag}"
        return path, timed(partial(quantize, pre, fts, path, SCHEMES[scheme], progress=False, executor=executor, device=device), device)

    def merged(spec: str, pack: Path, device: str) -> tuple[str, float]:
        method, options = method_spec(spec)
        out = args.workdir / "merged" / f"{pack.name}-{method}.safetensors"
        _, vectors = load_task_vectors(pre, packs=[pack])
        secs = timed(partial(merge, method, pre, vectors, out, options, executor=executor, device=device), device)
        digest = sha256_file(out)
        out.unlink()
        return digest, secs

    for scheme in args.schemes.split(","):
        (cpu_pack, cpu_s), (dev_pack, dev_s) = quantized(scheme, "cpu", "host"), quantized(scheme, dev, "device")
        same, worst = pack_identity(cpu_pack, dev_pack)
        rows.append({"step": f"quantize {scheme}", "cpu_s": cpu_s, "device_s": dev_s, "identical": same, "stat_rel_diff": worst})
        print(rows[-1], flush=True)
    methods = args.methods.split(",") if args.methods else merge_methods()
    for pack_name in args.merge_packs.split(","):
        pack = args.workdir / "packs" / f"{pack_name}-host"
        for method in methods:
            cls = available_methods()[method_spec(method)[0]]
            row: dict = {"step": f"merge {method} <- {pack_name}", "on_device": cls.on_device}
            saved = cls.on_device
            try:
                cpu_digest, row["cpu_s"] = merged(method, pack, "cpu")
                cls.on_device = True
                dev_digest, row["device_s"] = merged(method, pack, dev)
                row["identical"] = cpu_digest == dev_digest
            except Exception as exc:  # noqa: BLE001 — a method that cannot run there is a finding, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            finally:
                cls.on_device = saved
            rows.append(row)
            print(row, flush=True)
    (args.out / "device.json").write_text(json.dumps({"params": params, "tasks": args.tasks, "rows": rows}, indent=1))
    print("\n| step | CPU s | device s | device / CPU | identical |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['step']} | {r.get('cpu_s', float('nan')):.2f} | — | — | error: {r['error'][:120]} |")
        else:
            print(f"| {r['step']} | {r['cpu_s']:.2f} | {r['device_s']:.2f} | {r['device_s'] / r['cpu_s']:.2f} | {r['identical']} |")


if __name__ == "__main__":
    main()
