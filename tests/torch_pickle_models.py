"""Pickled modules of classes tvq cannot import: the paper's checkpoints in miniature.

The classes live in a helper module written to a temporary folder and imported only while
``torch.save`` runs; afterwards the module is removed from ``sys.modules`` and its folder from
``sys.path``, so nothing that reads the files can import them. ``importable`` brings them
back for the official code's ``torch.load``.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

HELPER = '''
import enum
import functools

import torch
from torch import nn


class Mode(enum.Enum):
    BILINEAR = "bilinear"


def touch(path):
    """Called by nothing that reads the file: a side effect would show it ran."""
    open(path, "w").close()


class Preprocess:
    """Not a module: transforms with an enum, a partial and a tensor attribute (as open_clip's)."""

    def __init__(self):
        self.mean = torch.tensor([0.48, 0.45, 0.40])
        self.mode = Mode.BILINEAR
        self.fn = functools.partial(max, 1)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class VisionTower(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, d, 4, 4, bias=False)
        self.bn = nn.BatchNorm2d(d)
        self.class_embedding = nn.Parameter(torch.randn(d))
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.proj = nn.Parameter(torch.randn(6, d).t())  # a transposed view: strides (1, d)
        self.register_buffer("attn_mask", torch.ones(3, 3), persistent=False)


class TinyCLIP(nn.Module):
    """open_clip's CLIP in miniature: a vision tower, a token embedding the image encoder never uses."""

    def __init__(self, d=8):
        super().__init__()
        self.visual = VisionTower(d)
        self.token_embedding = nn.Embedding(12, d)
        self.logit_scale = nn.Parameter(torch.ones([]) * 2.6)
        self.register_buffer("scale", torch.tensor(2.0))
        self.register_module("missing", None)


class ImageEncoder(nn.Module):
    """task_vectors' src.modeling.ImageEncoder: the model, its transforms, a cache folder."""

    def __init__(self, d=8):
        super().__init__()
        self.model = TinyCLIP(d)
        self.train_preprocess = Preprocess()
        self.val_preprocess = self.train_preprocess
        self.cache_dir = None
'''


@contextlib.contextmanager
def importable(folder: Path, name: str) -> Iterator[ModuleType]:
    """The helper module imported from ``folder``, removed again on exit."""
    sys.path.insert(0, str(folder))
    try:
        importlib.invalidate_caches()
        yield importlib.import_module(name)
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(folder))


def helper_module(root: Path) -> tuple[Path, str]:
    """Write the helper module under a fresh name; (its folder, its name)."""
    name = f"tvq_test_modeling_{uuid.uuid4().hex[:8]}"
    folder = root / "classes"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(HELPER)
    return folder, name


def perturbed(module: torch.nn.Module, seed: int, frozen: tuple[str, ...] = ("token_embedding",)) -> None:
    """Fine-tune in miniature: every float parameter and buffer moves, except ``frozen`` ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in module.state_dict(keep_vars=True).items():
            if t.is_floating_point() and not any(f in key for f in frozen):
                t.add_(torch.randn(t.shape, generator=g) * 0.01)


def save_layout(root: Path, tasks: tuple[str, ...] = ("Cars", "DTD"), legacy: bool = False) -> dict:
    """The paper's layout under ``root/ViT-B-32``: zeroshot.pt and <Task>/finetuned.pt (each
    task folder holding a zeroshot.pt too, as task_vectors' fine-tuning writes it); returns
    the state dicts and the helper module's folder and name."""
    folder, name = helper_module(root)
    model_dir = root / "ViT-B-32"
    states: dict[str, dict[str, torch.Tensor]] = {}
    with importable(folder, name) as mod:
        torch.manual_seed(0)
        encoder = mod.ImageEncoder()
        model_dir.mkdir()
        torch.save(encoder, model_dir / "zeroshot.pt", _use_new_zipfile_serialization=not legacy)
        states["zeroshot"] = {k: v.clone() for k, v in encoder.state_dict().items()}
        for i, task in enumerate(tasks):
            (model_dir / task).mkdir()
            torch.save(encoder, model_dir / task / "zeroshot.pt", _use_new_zipfile_serialization=not legacy)
            tuned = mod.ImageEncoder()
            tuned.load_state_dict(states["zeroshot"])
            perturbed(tuned, i + 1)
            torch.save(tuned, model_dir / task / "finetuned.pt", _use_new_zipfile_serialization=not legacy)
            states[task] = {k: v.clone() for k, v in tuned.state_dict().items()}
    return {"dir": model_dir, "states": states, "classes": folder, "module": name}
