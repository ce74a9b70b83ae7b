"""Export one task from a pack: its dequantized task vector, or the reconstructed model."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from tvq.errors import ConfigError
from tvq.io.atomic import atomic_file, check_output
from tvq.io.dtypes import output_dtype
from tvq.io.safetensors_writer import StreamingSafetensorsWriter
from tvq.io.torch_pickle_writer import pickle_template, write_like
from tvq.merge.engine import write_task_folder
from tvq.merge.source import check_pack_bases
from tvq.pack.reader import Pack, open_pack


def export_task(
    pack_path: str | Path,
    task: str,
    out: str | Path,
    *,
    pretrained: str | Path | None = None,
    model: bool = False,
    dtype: str = "same",
    overwrite: bool = False,
    unsafe_pickle: bool = False,
    progress: bool = True,
    out_kind: str = "file",
) -> None:
    """Stream τ̂ (fp32) or θ_pre + τ̂ (in the pretrained dtype, or ``dtype``) to ``out``: a
    safetensors file, or with ``model`` and a torch ``out`` (.pt) a copy of the pretrained torch
    file with the task's tensors in its storages (the paper's format, loadable by its code)."""
    try:
        cast = output_dtype(dtype)
    except ValueError as exc:
        raise ConfigError(f"--dtype {exc}") from None
    pack = open_pack(pack_path, pretrained, unsafe_pickle)
    pack.manifest.task(task)
    if pretrained is not None:  # before any output: a base of the right shapes but other weights is refused
        check_pack_bases(pack.pretrained, [pack_path])
    out = Path(out)
    inputs = [Path(pack_path)] + ([Path(pretrained)] if pretrained else [])
    if out_kind == "folder":  # a loadable folder (config copied from an HF pretrained folder), written like a merge
        if not model:
            raise ConfigError("--out-kind folder writes a model: add --model")
        write_task_folder(pack, task, out, pretrained, cast, overwrite=overwrite, progress=progress, inputs=inputs)
        return
    check_output(out, overwrite, inputs, kind="file")
    names = list(pack.pretrained.keys()) if model else pack.keys
    template = pickle_template(pack.pretrained, out) if model else None
    if template is not None:  # a .pt like the pretrained torch file (the paper's zeroshot.pt): its program kept
        tensors = ((key, _model_tensor(pack, task, key, cast)) for key in tqdm(names, desc=f"export {task}", unit="tensor", disable=not progress))
        with atomic_file(out, overwrite=overwrite) as tmp:
            write_like(template, tensors, tmp, cast)
        return
    with atomic_file(out, overwrite=overwrite) as tmp:
        writer = StreamingSafetensorsWriter(tmp, names, {"format": "pt", "tvq_task": task})
        try:
            for key in tqdm(names, desc=f"export {task}", unit="tensor", disable=not progress):
                if not model:
                    writer.add(key, pack.task_tensor(task, key))
                    continue
                writer.add(key, _model_tensor(pack, task, key, cast))
            writer.close()
        except BaseException:
            writer.abort()
            raise


def _model_tensor(pack: Pack, task: str, key: str, cast: torch.dtype | None) -> torch.Tensor:
    """θ_pre + τ̂ for one tensor (in ``cast`` or the pretrained dtype); other tensors (non-float
    buffers) come from the pretrained model as they are."""
    base = pack.pretrained.get(key)
    if key not in pack.keys:
        return base
    return (base.float() + pack.task_tensor(task, key)).to(cast or base.dtype)
