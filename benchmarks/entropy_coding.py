"""Entropy coding of packs (issue 15, part 1): bits on disk with the coder on and off, decode
throughput, and merge time from coded vs plain packs, all measured in one run.

Not a test. Inputs are a text benchmark run (MiniLM fine-tuned on text tasks; by default the CI
preset's 4, built with ``tvq bench run --preset ci``; ``--run`` another, e.g. the full preset's 8,
``tvq bench build --preset full``; README "The benchmark"). For each scheme it writes
the pack with ``entropy="off"`` and ``"auto"`` and reports, per task:

* bits per parameter and per *trained* parameter (tensors fine-tuning changed; the frozen word
  embeddings are stored as a constant and cost nothing), from bytes on disk (manifest included),
  and where the coded pack's bits per trained parameter go: codes, exactly stored tensors (coded
  too since format 4), and safetensors headers plus manifest;
* the order-0 entropy of the codes (a lower bound for any coder of iid codes, per trained param);
* decode: MB/s (best of 3) of plain packed codes produced when reading every quantized tensor's codes
  (read + sha256 + decode + unpack), coded vs plain, and quantize wall time;
* task arithmetic merge wall time (best of 2) from the coded and the plain pack (the outputs compared byte
  for byte);
* with ``--ans`` (needs ``pip install constriction``), the size and decode speed of constriction's
  ANS coder with a per-tensor categorical model of the codes, the alternative that was measured.

    python benchmarks/entropy_coding.py [--run ~/.cache/tvq/bench/runs/ci] [--workdir /tmp/tvq-entropy] [--ans]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tvq import QuantizeOptions, open_pack, quantize
from tvq.io.readers import open_checkpoint
from tvq.merge import load_task_vectors
from tvq.merge.engine import merge_state_dict
from tvq.pack.reader import Pack
from tvq.quant.packing import packed_nbytes
from tvq.report import pack_summary

SCHEMES = {
    "TVQ INT2": QuantizeOptions(bits=2),
    "TVQ INT3": QuantizeOptions(bits=3),
    "TVQ INT4": QuantizeOptions(bits=4),
    "RTVQ B3O2": QuantizeOptions(bits=2, base_bits=3, residual=True),
}


def trained_params(pre_path: Path, ft_paths: dict[str, Path]) -> int:
    """Parameters in tensors that fine-tuning changed (as tvq.bench.matrix counts them)."""
    pre = open_checkpoint(pre_path)
    fts = [open_checkpoint(p) for p in ft_paths.values()]
    keys = [k for k in pre.keys() if pre.meta(k).is_float]  # noqa: SIM118 -- a reader, not a dict
    return sum(pre.meta(k).numel for k in keys if any(not torch.equal(pre.get(k), f.get(k)) for f in fts))


def quantized(pack: Pack) -> list[tuple[str, str]]:
    return [(rel, k) for rel, f in pack.manifest.files.items() for k, e in f.tensors.items() if e.kind == "q"]


def read_codes(pack: Pack) -> tuple[float, int]:
    """Seconds to read every quantized tensor's codes, and the plain packed bytes they stand for."""
    t0 = time.perf_counter()
    plain = 0
    for rel, key in quantized(pack):
        entry = pack.manifest.files[rel].tensors[key]
        pack._codes(rel, key, entry)  # type: ignore[arg-type]
        plain += packed_nbytes(entry.numel, entry.bits or 0)
    return time.perf_counter() - t0, plain


def code_entropy_bytes(pack: Pack) -> float:
    """Order-0 entropy of each tensor's codes, summed (bytes)."""
    total = 0.0
    for rel, key in quantized(pack):
        entry = pack.manifest.files[rel].tensors[key]
        codes = pack._codes(rel, key, entry).numpy()  # type: ignore[arg-type]
        counts = np.bincount(codes, minlength=1 << (entry.bits or 0))
        p = counts[counts > 0] / counts.sum()
        total += float(-(p * np.log2(p)).sum()) * codes.size / 8
    return total


def ans(pack: Pack) -> tuple[int, float, int]:
    """constriction's ANS over each tensor's codes (categorical model from their counts, blocks of
    2^20 codes): coded bytes (the counts at 4 bytes each included), decode seconds, codes."""
    import constriction

    size, seconds, n = 0, 0.0, 0
    for rel, key in quantized(pack):
        entry = pack.manifest.files[rel].tensors[key]
        codes = pack._codes(rel, key, entry).numpy().astype(np.int32)  # type: ignore[arg-type]
        counts = np.bincount(codes, minlength=1 << (entry.bits or 0))
        model = constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)
        blocks = []
        for start in range(0, codes.size, 1 << 20):
            coder = constriction.stream.stack.AnsCoder()
            coder.encode_reverse(codes[start : start + (1 << 20)], model)
            blocks.append(coder.get_compressed())
        size += sum(b.nbytes for b in blocks) + 4 * counts.size
        t0 = time.perf_counter()
        for i, b in enumerate(blocks):
            out = constriction.stream.stack.AnsCoder(b).decode(model, min(1 << 20, codes.size - i * (1 << 20)))
            assert np.array_equal(out, codes[i * (1 << 20) : i * (1 << 20) + out.size])
        seconds += time.perf_counter() - t0
        n += codes.size
    return size, seconds, n


def merge_seconds(pre: Path, pack: Path) -> tuple[float, dict[str, torch.Tensor]]:
    t0 = time.perf_counter()
    base, vectors = load_task_vectors(pre, packs=[pack])
    merged = merge_state_dict("task_arithmetic", base, vectors, {"lam": 0.3})
    return time.perf_counter() - t0, merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path.home() / ".cache/tvq/bench/runs/ci")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tvq-entropy"))
    ap.add_argument("--ans", action="store_true", help="also measure constriction's ANS coder (pip install constriction)")
    ap.add_argument("--tasks", help="comma-separated tasks of the run (default: all of them; the CI preset has 4, the full one 8)")
    args = ap.parse_args()
    manifest = args.run / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} not found: build a run first (README, 'The benchmark')")
    tasks = args.tasks.split(",") if args.tasks else json.loads(manifest.read_text())["tasks"]
    torch.set_num_threads(1)  # tvq's executors run torch single-threaded per tensor; a shared machine also stalls torch's pool
    pre = args.run / "pretrained" / "model.safetensors"
    fts = {t: args.run / t / "model.safetensors" for t in tasks}
    missing = [p for p in [pre, *fts.values()] if not p.is_file()]
    if missing:
        raise SystemExit(f"{missing[0]} not found: the run is incomplete (build it again: README, 'The benchmark')")
    shutil.rmtree(args.workdir, ignore_errors=True)
    trained = trained_params(pre, fts)
    print(f"{len(tasks)} tasks; {trained:,} trained parameters; torch threads {torch.get_num_threads()}\n")
    head = ("| scheme | bits/param off | bits/param on | bits/trained param off | bits/trained param on | on/off | "
            "code entropy bits/trained param | codes on/off | decode MB/s off | decode MB/s on | quantize s off / on | "
            "TA merge s off / on | merges identical | on: codes / exact tensors (off) / headers+manifest (off) |")  # fmt: skip
    print(head + (" ANS codes on/off | ANS decode MB/s |" if args.ans else ""))
    print("|" + "---|" * (head.count("|") - 1 + (2 if args.ans else 0)))
    for label, options in SCHEMES.items():
        paths, info, seconds = {}, {}, {}
        for mode in ("off", "auto"):
            paths[mode] = args.workdir / f"{label.replace(' ', '-')}-{mode}"
            t0 = time.perf_counter()
            quantize(pre, fts, paths[mode], QuantizeOptions(**{**vars(options), "entropy": mode}), progress=False)
            seconds[mode] = time.perf_counter() - t0
            info[mode] = pack_summary(paths[mode])
        packs = {mode: open_pack(p) for mode, p in paths.items()}
        per_task = {mode: info[mode]["total_bytes"] * 8 / len(tasks) for mode in info}
        decode = {mode: min(read_codes(packs[mode]) for _ in range(3)) for mode in packs}  # best of 3: a shared machine
        merges = {mode: min((merge_seconds(pre, paths[mode]) for _ in range(2)), key=lambda r: r[0]) for mode in paths}
        identical = all(merges["off"][1][k].numpy().tobytes() == merges["auto"][1][k].numpy().tobytes() for k in merges["off"][1])
        e = info["auto"]["entropy"]
        per = 8 / len(tasks) / trained  # bytes of the whole pack -> bits per trained parameter per task
        parts = {mode: (info[mode]["entropy"]["stored_bytes"], info[mode]["entropy"]["raw_stored_bytes"],
                        info[mode]["total_bytes"] - info[mode]["theoretical_bytes"]) for mode in info}  # fmt: skip
        entropy = code_entropy_bytes(packs["off"])
        row = [
            label,
            f"{info['off']['bits_per_param']:.3f}", f"{info['auto']['bits_per_param']:.3f}",
            f"{per_task['off'] / trained:.3f}", f"{per_task['auto'] / trained:.3f}",
            f"{info['auto']['total_bytes'] / info['off']['total_bytes']:.3f}",
            f"{entropy * 8 / len(tasks) / trained:.3f}",
            f"{e['stored_bytes'] / e['plain_bytes']:.3f}",
            f"{decode['off'][1] / 1e6 / decode['off'][0]:.0f}", f"{decode['auto'][1] / 1e6 / decode['auto'][0]:.0f}",
            f"{seconds['off']:.1f} / {seconds['auto']:.1f}",
            f"{merges['off'][0]:.2f} / {merges['auto'][0]:.2f}",
            "yes" if identical else "NO",
            f"{parts['auto'][0] * per:.3f} / {parts['auto'][1] * per:.3f} ({parts['off'][1] * per:.3f}) / "
            f"{parts['auto'][2] * per:.3f} ({parts['off'][2] * per:.3f})",
        ]  # fmt: skip
        if args.ans:
            size, secs, _ = ans(packs["off"])
            row += [f"{size / e['plain_bytes']:.3f}", f"{e['plain_bytes'] / 1e6 / secs:.0f}"]
        print("| " + " | ".join(row) + " |", flush=True)
        assert math.isfinite(per_task["auto"])
    print("\non/off: bytes on disk with entropy coding over without; codes on/off: the quantized tensors' codes alone;"
          " decode MB/s: plain packed bytes produced per second (read, sha256, decode, unpack), one thread;"
          " last column: bits per trained parameter per task of the coded pack's codes, exact tensors and"
          " headers+manifest (the plain pack's in parentheses)")  # fmt: skip


if __name__ == "__main__":
    main()
