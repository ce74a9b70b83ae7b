"""Build a vision run: splits, pretrained encoder, frozen heads, one fully fine-tuned encoder per task.

The same layout, caching and resume rules as the text suite (``tvq.bench.building``), with image
splits as ``splits/<task>.npz`` and the manifest marked ``"suite": "vision"``::

    manifest.json  pretrained/  <task>/  heads.safetensors  splits/<task>.npz

Each encoder folder holds ``model.safetensors`` (every tensor, BatchNorm statistics included)
and ``tvq_encoder.json`` (how to rebuild the module). Fine-tuning is the paper's setting: every
parameter trained, BatchNorm in train mode, against a frozen head, so the task vector is the
only task-specific state.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tvq.bench import BenchError
from tvq.bench.building import Log, build_tasks, check_reuse, fit, previous_manifest, record_task_splits, run_folder, steps_for
from tvq.bench.evaluate import RUN_FORMAT
from tvq.bench.model import class_mean_head, cosine_logits
from tvq.bench.vision.config import VisionConfig
from tvq.bench.vision.data import ImageSplits, get_image_task, load_images, split_images
from tvq.bench.vision.encoders import ImageEncoder, make_encoder
from tvq.bench.vision.run import VisionTask, accuracy, embed_images, reestimate_on


def finetune_images(
    model: nn.Module,
    encoder: ImageEncoder,
    head: torch.Tensor,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    config: VisionConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
    """Fine-tune ``model`` in place (train mode: BatchNorm uses and updates batch statistics).

    Cross-entropy on ``logit_scale · cos`` against the frozen ``head``; AdamW with a one-cycle
    schedule; shuffled batches (a last batch of one image is dropped: BatchNorm needs two). The
    global RNG is left untouched, so results depend only on ``seed``.
    """
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n, bs = len(y_all), config.batch_size

    def epoch_batches(g: torch.Generator) -> Iterator[np.ndarray]:
        perm = torch.randperm(n, generator=g).numpy()
        for start in range(0, n, bs):
            if n - start >= 2:  # BatchNorm needs two images
                yield np.sort(perm[start : start + bs])

    def loss_of(idx: np.ndarray) -> torch.Tensor:
        feats = F.normalize(encoder.features(model, encoder.pixels(images[idx])).float(), dim=-1)
        return F.cross_entropy(cosine_logits(feats, head, config.logit_scale), y_all[idx])

    steps = steps_for(n, bs, config.epochs, min_batch=2)
    return fit(model, config, steps, epoch_batches, loss_of, seed=seed, progress=progress, desc=desc)


def state_sha256(module: nn.Module) -> str:
    """Identity of the pretrained weights (every tensor's name, dtype, shape and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class VisionSteps:
    """The vision suite's steps of a build (``tvq.bench.building.SuiteSteps``): BatchNorm
    statistics are the task's own, estimated on its training images, for the head and after
    fine-tuning ("precise BN")."""

    def __init__(self, config: VisionConfig, encoder: ImageEncoder) -> None:
        self.config, self.encoder = config, encoder

    def head(self, model: nn.Module, name: str, splits: ImageSplits) -> torch.Tensor:
        """The frozen head; leaves ``model`` (pretrained weights) with the task's BN statistics."""
        config, encoder = self.config, self.encoder
        reestimate_on(model, encoder, [splits.images("train")], config.bn_images, config.seed)
        if config.head == "text":
            if encoder.text_head is None:
                raise BenchError(f"head 'text' needs an encoder with a text tower (a CLIPModel folder); '{encoder.kind}' has none")
            return encoder.text_head(splits.classes).float()
        emb = embed_images(model, encoder, splits.images("train"), config.eval_batch_size)
        return class_mean_head(emb, splits.labels("train").tolist(), len(splits.classes), name)

    def accuracy(self, model: nn.Module, name: str, splits: ImageSplits, head: torch.Tensor) -> float:
        c = self.config
        return accuracy(model, VisionTask(name, splits.classes, head, splits, self.encoder, c.logit_scale, c.eval_batch_size), "test")

    def finetune(self, model: nn.Module, name: str, splits: ImageSplits, head: torch.Tensor, seed: int, progress: bool) -> dict[str, Any]:
        c = self.config
        stats = finetune_images(model, self.encoder, head, splits.images("train"), splits.labels("train"), c, seed=seed, progress=progress, desc=name)
        reestimate_on(model, self.encoder, [splits.images("train")], c.bn_images, c.seed)  # precise BN
        return stats

    def save(self, model: nn.Module, folder: Path) -> None:
        self.encoder.save(model, folder)


def build(
    config: VisionConfig,
    out: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    log: Log | None = None,
) -> dict[str, Any]:
    """Build (or finish building) the vision run in ``out`` (default ``<cache>/runs/vision-<preset>``); returns the manifest."""
    log = log or (lambda s: tqdm.write(s))
    out, cache = run_folder(out, cache_dir, f"vision-{config.preset}")
    t_build = time.perf_counter()
    t0 = time.perf_counter()
    encoder = make_encoder(config.encoder, config.image_size)
    model = encoder.module
    encoder_sha = state_sha256(model)
    load_s = time.perf_counter() - t0
    manifest = check_reuse(out, previous_manifest(out), config, encoder_sha, force, suite="vision")

    splits: dict[str, ImageSplits] = {}
    for name in config.tasks:
        data = load_images(get_image_task(name), cache)
        splits[name] = split_images(data, seed=config.seed, train=config.train_size, val=config.val_size, test=config.test_size)
    prior = list(manifest.get("tasks", []))
    manifest.update(
        format=RUN_FORMAT,
        suite="vision",
        version=1,
        preset=config.preset,
        config=config.model_dump(),
        encoder={"kind": encoder.kind, "spec": encoder.spec, "sha256": encoder_sha},
        tasks=prior + [t for t in splits if t not in prior],
        environment={
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "pillow": _version("pillow"),
        },  # fmt: skip
    )
    record_task_splits(out, manifest, splits, config.seed, force, ".npz", grouped=False)
    manifest.setdefault("timings", {})["load_s"] = round(load_s, 2)
    return build_tasks(out, manifest, splits, model, encoder_sha, VisionSteps(config, encoder), progress=progress, log=log, t_build=t_build)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


__all__ = ["build", "finetune_images", "state_sha256"]
