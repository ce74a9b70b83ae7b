"""Model references: a local path, or a Hugging Face Hub id ``org/name[@revision]``.

Wherever tvq takes a model path it also takes a hub id, as mergekit and transformers do. A
path that exists on disk always wins (``org/name`` may be a relative folder); otherwise a
string of the hub's shape is resolved with ``huggingface_hub.snapshot_download`` into its cache
(offline with ``HF_HUB_OFFLINE=1``: only what the cache holds), fetching only what a merge
needs (torch weights, configs, tokenizers: no TensorFlow, Flax or ONNX copies). The files then
go through the same readers and the same folder confinement as any local folder.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from tvq.errors import CheckpointError

# org/name with the hub's characters, and an optional @revision (branch, tag or commit)
HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]{0,255}))?$"
)
IGNORED = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "tf_model*", "flax_model*", "onnx/*", "openvino/*", "coreml/*"]


def parse_hub_id(reference: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``reference`` has a hub id's shape, else None."""
    match = HUB_ID.match(reference)
    if match is None or ".." in reference:
        return None
    return match["repo"], match["revision"]


@functools.lru_cache(maxsize=256)
def _snapshot(repo: str, revision: str | None) -> Path:
    """One resolution per process: a merge opens the pretrained model more than once."""
    import huggingface_hub  # deferred: hub ids are rare, the import costs

    return Path(huggingface_hub.snapshot_download(repo, revision=revision, ignore_patterns=IGNORED))


def hub_id_of(path: str | Path) -> str | None:
    """``org/name@commit`` for a snapshot folder of huggingface_hub's cache (what a hub id
    resolved to), else None: records then name the model, not this machine's cache."""
    parts = Path(path).parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    reference = f"{parts[-3].removeprefix('models--').replace('--', '/', 1)}@{parts[-1]}"
    return reference if parse_hub_id(reference) is not None else None


def hub_reference(reference: str | Path) -> bool:
    """Whether ``reference`` names a hub model (the hub's shape, and no such local path)."""
    return not Path(reference).exists() and parse_hub_id(str(reference)) is not None


def resolve_model(reference: str | Path) -> Path:
    """The local path of a model reference: the path itself when it exists, else the cached
    snapshot of a hub id (downloaded when the hub is reachable and the cache lacks it)."""
    path = Path(reference)
    if path.exists():
        return path
    parsed = parse_hub_id(str(reference))
    if parsed is None:
        return path  # not a hub id: the reader says the file is missing
    repo, revision = parsed
    import huggingface_hub.errors  # deferred (a core dependency): hub ids are rare, the import costs

    try:
        return _snapshot(repo, revision)
    except huggingface_hub.errors.LocalEntryNotFoundError:
        raise CheckpointError(
            f"{reference}: neither a local path nor a hub model in the cache (offline, or the hub is unreachable)"
        ) from None
    except (huggingface_hub.errors.HfHubHTTPError, ValueError, OSError) as exc:
        raise CheckpointError(f"{reference}: not a local path, and the hub could not provide it: {str(exc).splitlines()[0][:200]}") from None
