"""Export one task from a pack: its dequantized task vector, or the reconstructed model."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from tvq.errors import ConfigError
from tvq.io.atomic import atomic_file, check_output
from tvq.io.dtypes import output_dtype
from tvq.io.safetensors_writer import StreamingSafetensorsWriter
from tvq.pack.reader import open_pack


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
) -> None:
    """Stream τ̂ (fp32) or θ_pre + τ̂ (in the pretrained dtype, or ``dtype``) to ``out``."""
    try:
        cast = output_dtype(dtype)
    except ValueError as exc:
        raise ConfigError(f"--dtype {exc}") from None
    pack = open_pack(pack_path, pretrained, unsafe_pickle)
    pack.manifest.task(task)
    out = Path(out)
    inputs = [Path(pack_path)] + ([Path(pretrained)] if pretrained else [])
    check_output(out, overwrite, inputs, kind="file")
    names = list(pack.pretrained.keys()) if model else pack.keys
    with atomic_file(out, overwrite=overwrite) as tmp:
        writer = StreamingSafetensorsWriter(tmp, names, {"format": "pt", "tvq_task": task})
        try:
            for key in tqdm(names, desc=f"export {task}", unit="tensor", disable=not progress):
                if not model:
                    writer.add(key, pack.task_tensor(task, key))
                    continue
                base = pack.pretrained.get(key)
                if key not in pack.keys:
                    writer.add(key, base)  # non-float buffers come from the pretrained model
                    continue
                target = cast or base.dtype
                writer.add(key, (base.float() + pack.task_tensor(task, key)).to(target))
            writer.close()
        except BaseException:
            writer.abort()
            raise
