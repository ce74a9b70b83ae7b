"""How opening a pack's manifest scales with its number of entries (issue: strangers' packs).

Writes synthetic but valid manifests of N tensors x T tasks (quantized and constant entries,
as a budgeted pack has), then times ``read_manifest`` (parse with exact types, checksum,
complete validation) for growing N in this one process, and prints µs per entry and the
ratio to the smallest size: linear time shows as a flat µs/entry column.

    python benchmarks/manifest_open.py [--tasks 8] [--sizes 2000 8000 32000]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tvq.pack.manifest import FileEntry, InputRef, Manifest, Method, TaskEntry, TensorEntry
from tvq.pack.reader import read_manifest

HEX = hashlib.sha256(b"x").hexdigest()


def synthetic(n: int, tasks: int) -> Manifest:
    tensors = {}
    for i in range(n):
        if i % 4 == 3:
            tensors[f"model.layers.{i}.weight"] = TensorEntry(kind="const", shape=[64, 64], dtype="float32", bits=2, value=0.0)
        else:
            tensors[f"model.layers.{i}.weight"] = TensorEntry(
                kind="q", shape=[64, 64], dtype="float32", bits=2, scheme="minmax",
                params={"scale": 812.3, "zero_point": 2.0}, nbytes=1024, sha256=HEX,
            )  # fmt: skip
    files = {f"tasks/{t:03d}-t{t}.safetensors": FileEntry(bytes=n * 1100, sha256=HEX, tensors=tensors) for t in range(tasks)}
    ref = InputRef(path="/models/x", digest="blake3:" + HEX, fp32_bytes=n * 64 * 64 * 4)
    return Manifest(
        created_by="benchmark", method=Method(target="task_vector", bits=2), pretrained=ref,
        tasks=[TaskEntry(name=f"t{t}", file=f"tasks/{t:03d}-t{t}.safetensors", source=ref) for t in range(tasks)],
        files=files,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    table = Table(title=f"read_manifest: parse + checksum + validation, {args.tasks} tasks (best of {args.repeat})")
    for col in ("tensors/task", "entries", "manifest MB", "seconds", "µs/entry", "time ratio", "size ratio"):
        table.add_column(col, justify="right")
    first: tuple[float, int] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            pack = Path(tmp) / f"p{n}"
            pack.mkdir()
            (pack / "manifest.json").write_text(synthetic(n, args.tasks).to_json())
            best = min(_timed(pack) for _ in range(args.repeat))
            entries = n * args.tasks
            first = first or (best, entries)
            mb = (pack / "manifest.json").stat().st_size / 1e6
            table.add_row(f"{n:,}", f"{entries:,}", f"{mb:.1f}", f"{best:.3f}", f"{best / entries * 1e6:.2f}",
                          f"{best / first[0]:.2f}x", f"{entries / first[1]:.0f}x")  # fmt: skip
    Console().print(table)


def _timed(pack: Path) -> float:
    start = time.perf_counter()
    read_manifest(pack)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
