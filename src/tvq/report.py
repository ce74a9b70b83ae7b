"""Numbers about a pack, shared by ``tvq info`` and the benchmark reports."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tvq.io.dtypes import TORCH_DTYPES
from tvq.pack.manifest import MANIFEST_NAME, FileEntry, QuantizedEntry, RawEntry
from tvq.pack.reader import open_pack
from tvq.quant.packing import packed_nbytes
from tvq.quant.selection import is_statistic


def pack_summary(path: str | Path, verify: bool = False) -> dict:
    """Bytes on disk per task (with its share of the base), ratios, bits/param and errors."""
    pack = open_pack(path)
    if verify:
        pack.verify()
    m = pack.manifest
    n_tasks = len(m.tasks)
    base_bytes = m.files[m.base_file].bytes if m.base_file else 0
    manifest_bytes = (Path(path) / MANIFEST_NAME).stat().st_size
    first = m.files[m.tasks[0].file].tensors
    n_params = sum(e.numel for e in first.values())
    tasks = []
    for t in m.tasks:
        own = m.files[t.file].bytes
        share = own + base_bytes / n_tasks + manifest_bytes / n_tasks
        tasks.append(
            {
                "name": t.name,
                "bytes": round(share),
                "file_bytes": own,
                "fp32_bytes": t.source.fp32_bytes,
                "ratio": t.source.fp32_bytes / share,
                "bits_per_param": share * 8 / max(n_params, 1),
                "rel_error": t.rel_error,  # over every stored tensor (exact ones dilute it)
                "rel_error_quantized": t.rel_error_quantized,  # over quantized tensors; None for packs written before it was recorded
                "source": t.source.path,
            }
        )
    total = pack.total_bytes()
    total_fp32 = sum(t.source.fp32_bytes for t in m.tasks)
    theoretical = sum(e.stored_bytes for f in m.files.values() for e in f.tensors.values())
    allocation = {}
    for label, rel in [("base", m.base_file), ("tasks", m.tasks[0].file)]:
        if rel is None:
            continue
        hist: dict[str, dict[str, int]] = {}
        for e in m.files[rel].tensors.values():
            if e.kind == "raw":
                continue
            h = hist.setdefault("0" if e.kind == "const" else str(e.bits), {"tensors": 0, "params": 0})
            h["tensors"] += 1
            h["params"] += e.numel
        allocation[label] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    return {
        "path": str(path),
        "allocation": allocation,
        "entropy": entropy_summary(m.files.values()),
        "method": {**m.method.model_dump(), "label": m.method.label},
        "tasks": tasks,
        "base_bytes": base_bytes,
        "total_bytes": total,
        "total_fp32_bytes": total_fp32,
        "ratio": total_fp32 / total,
        "bits_per_param": total * 8 / max(n_params * n_tasks, 1),
        "n_params": n_params,
        "theoretical_bytes": theoretical,
        "overhead_bytes": total - theoretical,
        "pretrained": m.pretrained.path,
        "skipped": m.skipped,
        "statistics": [k for k in first if is_statistic(k)],  # running statistics, stored exactly
    }


def entropy_summary(files: Iterable[FileEntry]) -> dict[str, int]:
    """What entropy coding saved: the codes' bytes on disk against plain bit packing's, and the
    exactly stored tensors' against their own."""
    files = list(files)
    quantized = [e for f in files for e in f.tensors.values() if isinstance(e, QuantizedEntry)]
    plain = sum(packed_nbytes(e.numel, e.bits) for e in quantized)
    stored = sum(e.nbytes for e in quantized)
    coded = sum(1 for e in quantized if e.entropy is not None)
    raw = [e for f in files for e in f.tensors.values() if isinstance(e, RawEntry)]
    raw_plain = sum(e.numel * TORCH_DTYPES[e.dtype].itemsize for e in raw)
    raw_stored = sum(e.nbytes for e in raw)
    return {"quantized_tensors": len(quantized), "coded_tensors": coded, "plain_bytes": plain, "stored_bytes": stored, "saved_bytes": plain - stored,
            # exactly stored tensors (format 4 codes them too): their bytes as they are and on disk
            "raw_tensors": len(raw), "raw_coded_tensors": sum(1 for e in raw if e.entropy is not None),
            "raw_plain_bytes": raw_plain, "raw_stored_bytes": raw_stored, "raw_saved_bytes": raw_plain - raw_stored}  # fmt: skip
