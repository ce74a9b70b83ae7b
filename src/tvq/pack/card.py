"""The model card a pack carries: ``README.md`` in the pack folder, as ``huggingface_hub.ModelCard``
writes it (YAML front matter: ``base_model``, ``tags``, ``library_name: tvq``, and ``tvq:`` with the
scheme, its bits and every task's bits on disk and error), then how to merge the pack.

The card is for people and the Hub. tvq writes it beside the manifest and never reads it: it is
not listed in the manifest, carries no checksum, and a pack whose ``README.md`` is missing, huge
or not a file at all reads, verifies and merges the same (docs/pack-format.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from tvq.pack.manifest import MANIFEST_NAME, Manifest

CARD_NAME = "README.md"
TVQ_URL = "https://github.com/AIM-SKKU/TVQ"


def method_tag(manifest: Manifest) -> str:
    """The pack's method as a Hub tag: ``tvq-int4``, ``rtvq-b3o2-ec``, ``fq-int8``."""
    return re.sub(r"[^a-z0-9]+", "-", manifest.method.label.lower().replace("+", "-")).strip("-")


def task_rows(manifest: Manifest, manifest_bytes: int) -> list[dict[str, Any]]:
    """Per task: bytes on disk (its file, plus its share of the base and the manifest), bits per
    parameter on disk, and the errors measured while quantizing (as ``tvq info`` reports them)."""
    m = manifest
    n_params = max(sum(e.numel for e in m.files[m.tasks[0].file].tensors.values()), 1)
    shared = (m.files[m.base_file].bytes if m.base_file else 0) + manifest_bytes
    rows = []
    for t in m.tasks:
        share = m.files[t.file].bytes + shared / len(m.tasks)
        row: dict[str, Any] = {"name": t.name, "bytes": round(share), "bits_per_param": round(share * 8 / n_params, 4)}
        row["rel_error"] = t.rel_error
        if t.rel_error_quantized is not None:
            row["rel_error_quantized"] = t.rel_error_quantized
        rows.append(row)
    return rows


def pack_card(manifest: Manifest, manifest_bytes: int) -> str:
    """``README.md`` of a pack (``manifest_bytes``: the size of its manifest.json). It depends on the
    manifest only, so packs with the same bytes have the same card wherever they are written."""
    m = manifest.method
    scheme = {"label": m.label, "target": m.target, "residual": m.residual, "bits": m.bits, "quantizer": m.quantizer,
              "key_rule": m.key_rule}  # fmt: skip
    if m.residual:
        scheme.update(base_bits=m.base_bits, error_correction=m.error_correction)
    if m.budget_bits is not None:
        scheme["budget_bits"] = m.budget_bits
    rows = task_rows(manifest, manifest_bytes)
    base = manifest.pretrained.path
    data = ModelCardData(
        base_model=base,
        library_name="tvq",
        tags=["tvq", "task-vectors", "quantized", method_tag(manifest)],
        tvq={"pack_format": manifest.version, "scheme": scheme, "pretrained_digest": manifest.pretrained.digest,
             "tasks": rows},  # fmt: skip
    )
    table = "\n".join(
        f"| {r['name']} | {r['bytes']:,} | {r['bits_per_param']:.3f} | {_error(r['rel_error'])} | {_error(r.get('rel_error_quantized'))} |"
        for r in rows
    )
    body = f"""# Task-vector pack ({m.label})

Quantized task vectors τ_t = θ_t − θ_pre of {len(rows)} task(s), written by [tvq]({TVQ_URL}) with
**{m.label}** (quantizer `{m.quantizer}`, key rule `{m.key_rule}`), against the pretrained model
`{base}` (content hash `{manifest.pretrained.digest}`). `manifest.json` describes every file and
checksum; this card is not part of the pack's data.

## Tasks

| task | bytes on disk | bits / parameter | rel. error | rel. error (quantized tensors) |
|---|---|---|---|---|
{table}

Bytes on disk count each task's file plus its share of the shared base and the manifest.

## Use

```
tvq info PACK --verify
tvq merge --method ties --pack PACK --pretrained BASE --out merged/
tvq export PACK --task TASK --model -p BASE --out-kind folder --out TASK/
```

`PACK` is this folder; `BASE` is the pretrained model above (tvq checks its content hash before merging or
exporting, and refuses another model of the same shapes).
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def write_pack_card(folder: Path, manifest: Manifest) -> None:
    """Write ``README.md`` into a pack being written (``folder``: its temporary folder, after the manifest)."""
    manifest_bytes = (folder / MANIFEST_NAME).stat().st_size
    (folder / CARD_NAME).write_text(pack_card(manifest, manifest_bytes))
