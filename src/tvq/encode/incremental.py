"""Growing and re-basing packs without touching what is already encoded.

Adding a task to an RTVQ pack keeps the stored base deq(Q(β)) and encodes only the new
offset against θ_pre + deq(Q(β)) (error-correction style: θ_avg of the old tasks is not
stored). The old files are hard-linked into the new pack, byte for byte. Re-basing
recomputes β over all current tasks, from their original checkpoints when they are still
there (their content hashes are checked) or, with ``from_pack``, from the pack's own
reconstructions θ_pre + τ̂.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from tvq.encode.job import PRETRAINED, KeyJob, Source, task_groups
from tvq.encode.options import BitPlan, QuantizeOptions
from tvq.encode.pipeline import QuantizeReport, StreamStats, check_task_names, encode_all, quantize, task_file_name
from tvq.errors import CheckpointError, ConfigError, where
from tvq.execute import Executor
from tvq.io.atomic import atomic_dir, check_output
from tvq.io.content_hash import algorithm_of
from tvq.io.readers import TensorMeta, open_checkpoint
from tvq.pack.card import write_pack_card
from tvq.pack.manifest import MANIFEST_NAME, Manifest, QuantizedEntry, RawEntry, announced_names, entropy_coded, written_version
from tvq.pack.reader import Pack, open_pack
from tvq.pack.validate import kept_keys
from tvq.pack.writer import PackFileWriter, close_all
from tvq.quant.schemes import get_scheme
from tvq.quant.selection import KeyRule, TensorRole, tensor_role
from tvq.vector import check_compatible
from tvq.version import __version__


def options_of(pack: Pack) -> QuantizeOptions:
    """The QuantizeOptions that produced a pack, per-tensor bit widths included."""
    m = pack.manifest.method
    first = pack.manifest.files[pack.manifest.tasks[0].file].tensors
    bits = {k: e.bits for k, e in first.items() if not isinstance(e, RawEntry) and e.bits is not None}
    base_bits = {}
    if pack.manifest.base_file:
        base = pack.manifest.files[pack.manifest.base_file].tensors
        base_bits = {k: e.bits for k, e in base.items() if not isinstance(e, RawEntry) and e.bits is not None}
    return QuantizeOptions(
        target=m.target,
        bits=m.bits,
        residual=m.residual,
        base_bits=m.base_bits,
        error_correction=m.error_correction,
        key_rule=KeyRule(m.key_rule),
        quantizer=m.quantizer,
        group_size=m.group_size or 128,
        bit_plan=BitPlan(budget_bits=m.budget_bits or 0.0, bits=bits, base_bits=base_bits,
                         schemes={k: e.scheme for k, e in first.items() if isinstance(e, QuantizedEntry) and e.scheme != m.quantizer},
                         allocation=m.allocation, anchor_bits=m.anchor_bits),
        entropy="auto" if _entropy_coded(pack) else "off",  # a pack keeps its format version as it grows
    )


def _entropy_coded(pack: Pack) -> bool:
    return entropy_coded(pack.manifest.files)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def add_tasks(
    pack_path: str | Path,
    finetuned: Mapping[str, str | Path],
    out: str | Path | None = None,
    *,
    pretrained: str | Path | None = None,
    overwrite: bool = False,
    unsafe_pickle: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> QuantizeReport:
    """Add tasks to a pack; the existing tasks (and an RTVQ base) are not re-encoded.

    ``out=None`` updates the pack in place, atomically (the old pack stays whole until the
    new one is complete).
    """
    check_task_names(finetuned)
    pack_path = Path(pack_path)
    pack = open_pack(pack_path, pretrained, unsafe_pickle)
    pack.verify()  # never carry corrupted files over
    clash = sorted(set(finetuned) & set(pack.tasks))
    if clash:
        raise ConfigError(f"{where(pack_path)}: task {clash[0]!r} is already in the pack")
    options = options_of(pack)
    pre = pack.pretrained
    readers = {n: open_checkpoint(p, unsafe_pickle) for n, p in finetuned.items()}
    for r in readers.values():
        check_compatible(pre, r)
    out_path = pack_path if out is None else Path(out)
    if out is not None:
        check_output(out_path, overwrite, [pack_path, *map(Path, finetuned.values())])

    m = pack.manifest
    first = m.files[m.tasks[0].file].tensors
    keys = sorted(pre.keys())
    roles = {}
    kept = kept_keys(m)  # raw in some task, or a kept tensor's zero (the paper rule's constant 0) in all
    for k in keys:
        if k not in first:
            roles[k] = TensorRole.SKIP
        elif k in kept:  # stays kept: raw where the new task changes it, the constant 0 where it does not
            roles[k] = TensorRole.STATISTIC if tensor_role(k, pre.meta(k), options.key_rule) == TensorRole.STATISTIC else TensorRole.KEEP
        else:
            roles[k] = TensorRole.QUANTIZE
    float_keys = [k for k in keys if roles[k] != TensorRole.SKIP]
    quant_keys = {k for k in float_keys if roles[k] == TensorRole.QUANTIZE}
    base_keys = set(m.files[m.base_file].tensors) if m.base_file else set()
    algorithm = algorithm_of(m.pretrained.digest)  # the pack's, so θ_pre's digest can be compared

    with atomic_dir(out_path, overwrite=out is None or overwrite) as tmp:
        for rel in m.files:
            _link_or_copy(pack_path / rel, tmp / rel)
        start = len(m.tasks)
        task_files = {n: task_file_name(start + i, n) for i, n in enumerate(readers)}
        names = announced_names(float_keys, quant_keys, get_scheme(options.quantizer).aux_names)
        writers = {n: PackFileWriter(tmp, task_files[n], names, {"task": n}) for n in readers}
        remote = getattr(executor, "remote", False)
        sources: dict[str, Source] = {n: (finetuned[n] if remote else readers[n]) for n in readers}
        pre_src = pre.path if remote else pre
        jobs = [
            group
            for k in keys
            for group in task_groups(KeyJob(k, roles[k], pre_src, sources, options, unsafe_pickle=unsafe_pickle,
                                            base_pack=str(pack_path) if options.residual and k in base_keys else None,
                                            digest_algorithm=algorithm))
        ]  # fmt: skip
        stats = StreamStats.for_tasks(list(readers), algorithm, quant_keys)
        try:
            encode_all(jobs, writers, stats, executor, desc="add tasks", progress=progress)
            new_files = {task_files[n]: entry for n, entry in close_all(writers).items()}
        finally:
            for w in writers.values():
                w.abort()
        if stats.digests[PRETRAINED].hexdigest() != m.pretrained.digest:
            raise CheckpointError(f"{where(pre.path)}: not the pretrained model this pack was made from (content hash differs)")
        reference: Literal["quantized_base"] | None = "quantized_base" if options.residual else None
        files = {**m.files, **new_files}
        manifest = Manifest(
            version=written_version(files),
            created_by=f"tvq {__version__}",
            method=m.method,
            pretrained=m.pretrained,
            tasks=[*m.tasks, *(stats.task_entry(n, task_files[n], finetuned[n], readers[n], reference) for n in readers)],
            base_file=m.base_file,
            skipped=m.skipped,
            files=files,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        write_pack_card(tmp, manifest)  # the old card is not carried over: it is not pack data
    written = sum(f.bytes for f in new_files.values()) + (out_path / MANIFEST_NAME).stat().st_size
    return QuantizeReport(manifest=manifest, bytes_read=stats.bytes_read, bytes_written=written)


class ReconstructedModel:
    """θ_pre + τ̂ of one task of a pack, read like a checkpoint (for re-basing from a pack)."""

    def __init__(self, pack: Pack, task: str) -> None:
        self.pack, self.task = pack, task
        self.path = Path(f"{pack.path}#{task}")
        self._pre = pack.pretrained
        self._float = set(pack.keys)

    def keys(self) -> list[str]:
        return self._pre.keys()

    def meta(self, key: str) -> TensorMeta:
        return self._pre.meta(key)

    def float_bytes(self) -> int:
        return self._pre.float_bytes()

    def get(self, key: str) -> torch.Tensor:
        base = self._pre.get(key)
        if key not in self._float:
            return base
        return (base.float() + self.pack.task_tensor(self.task, key)).to(base.dtype)


def rebase(
    pack_path: str | Path,
    out: str | Path,
    *,
    pretrained: str | Path | None = None,
    finetuned: Mapping[str, str | Path] | None = None,
    from_pack: bool = False,
    overwrite: bool = False,
    unsafe_pickle: bool = False,
    progress: bool = True,
) -> QuantizeReport:
    """Re-encode every task against a base recomputed over all of them (same method), from
    the tasks' original checkpoints named in ``finetuned`` (checked against the content
    hashes the pack recorded) or, with ``from_pack``, from the pack's reconstructions.
    The source paths a pack records are never opened: they come from whoever made it."""
    pack_path = Path(pack_path)
    pack = open_pack(pack_path, pretrained, unsafe_pickle)
    options = options_of(pack)
    if not options.residual:
        raise ConfigError(f"{where(pack_path)}: only RTVQ packs have a base to re-compute")
    if pretrained is None:
        pack.pretrained  # noqa: B018 -- raises the one-line error that names the recorded path
    options.bit_plan = None if not pack.manifest.method.budget_bits else options.bit_plan
    sources: dict[str, Source]
    if from_pack:
        if finetuned:
            raise ConfigError("give either --finetuned checkpoints or --from-pack, not both")
        sources = {t: ReconstructedModel(pack, t) for t in pack.tasks}
        expect = None
    else:
        named = dict(finetuned or {})
        missing = [t for t in pack.manifest.tasks if t.name not in named]
        if missing:
            t = missing[0]
            raise ConfigError(
                f"{where(pack_path)}: task {t.name!r} needs its original checkpoint: pass --finetuned {t.name}=PATH "
                f"(made from {t.source.path[:300]}), or --from-pack to re-base from the pack itself"
            )
        unknown = sorted(set(named) - set(pack.tasks))
        if unknown:
            raise ConfigError(f"{where(pack_path)}: no task {unknown[0]!r} in this pack; tasks: {', '.join(pack.tasks)}")
        sources = {t: named[t] for t in pack.tasks}
        expect = {t.name: t.source.digest for t in pack.manifest.tasks}
    return quantize(
        pack.pretrained, sources, out, options, overwrite=overwrite, unsafe_pickle=unsafe_pickle, progress=progress, expect_digests=expect
    )
