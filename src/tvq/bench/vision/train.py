"""Build a vision run: splits, pretrained encoder, frozen heads, one fully fine-tuned encoder per task.

The same layout, caching and resume rules as the text suite (``tvq.bench.train``, whose helpers
this reuses), with image splits as ``splits/<task>.npz`` and the manifest marked ``"suite": "vision"``::

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
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from tvq.bench import BenchError
from tvq.bench.data import default_cache_dir
from tvq.bench.evaluate import MANIFEST, RUN_FORMAT
from tvq.bench.model import class_mean_head, cosine_logits
from tvq.bench.train import DONE, Log, _check_reuse, _previous, _write_json, record_task_splits
from tvq.bench.vision.config import VisionConfig
from tvq.bench.vision.data import ImageSplits, get_image_task, load_images, split_images
from tvq.bench.vision.encoders import ImageEncoder, make_encoder
from tvq.bench.vision.run import VisionTask, accuracy, embed_images, reestimate_on
from tvq.io.atomic import atomic_dir, atomic_file


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
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(not any(f in name for f in config.freeze))
    params = [p for p in model.parameters() if p.requires_grad]
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n, bs = len(y_all), config.batch_size
    per_epoch = n // bs + (1 if n % bs >= 2 else 0)
    steps = max(per_epoch * config.epochs, 1)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=config.warmup, cycle_momentum=False)
    losses: list[float] = []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), tqdm(total=steps, desc=desc, disable=not progress, leave=False, unit="step") as bar:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(config.epochs):
            perm = torch.randperm(n, generator=g).numpy()
            for start in range(0, n, bs):
                idx = np.sort(perm[start : start + bs])
                if len(idx) < 2:
                    continue
                feats = F.normalize(encoder.features(model, encoder.pixels(images[idx])).float(), dim=-1)
                loss = F.cross_entropy(cosine_logits(feats, head, config.logit_scale), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
    return {"steps": len(losses), "train_s": round(time.perf_counter() - t0, 2), "loss_first": losses[0], "loss_last": losses[-1],
            "trainable": sum(p.numel() for p in params)}  # fmt: skip


def state_sha256(module: nn.Module) -> str:
    """Identity of the pretrained weights (every tensor's name, dtype, shape and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _head(config: VisionConfig, encoder: ImageEncoder, model: nn.Module, s: ImageSplits, name: str) -> torch.Tensor:
    """The frozen head; leaves ``model`` (pretrained weights) with the task's BN statistics."""
    if config.head == "text":
        reestimate_on(model, encoder, [s.images("train")], config.bn_images, config.seed)
        if encoder.text_head is None:
            raise BenchError(f"head 'text' needs an encoder with a text tower (a CLIPModel folder); '{encoder.kind}' has none")
        return encoder.text_head(s.classes).float()
    reestimate_on(model, encoder, [s.images("train")], config.bn_images, config.seed)
    emb = embed_images(model, encoder, s.images("train"), config.eval_batch_size)
    return class_mean_head(emb, s.labels("train").tolist(), len(s.classes), name)


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
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = Path(out) if out is not None else cache / "runs" / f"vision-{config.preset}"
    out.mkdir(parents=True, exist_ok=True)
    t_build = time.perf_counter()
    t0 = time.perf_counter()
    encoder = make_encoder(config.encoder, config.image_size)
    model = encoder.module
    encoder_sha = state_sha256(model)
    load_s = time.perf_counter() - t0
    manifest = _check_reuse(out, _previous(out), config, encoder_sha, force, suite="vision")

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
    infos = record_task_splits(out, manifest, splits, config.seed, force, ".npz", grouped=False)
    _write_json(out / MANIFEST, manifest)

    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    if not (out / "pretrained" / DONE).is_file():
        with atomic_dir(out / "pretrained") as tmp:
            encoder.save(model, tmp)
            _write_json(tmp / DONE, {"sha256": encoder_sha})
    manifest.setdefault("timings", {})["load_s"] = round(load_s, 2)

    heads: dict[str, torch.Tensor] = {}
    if (out / "heads.safetensors").is_file():
        with safe_open(str(out / "heads.safetensors"), "pt") as f:
            heads = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
    for i, (name, s) in enumerate(splits.items(), 1):
        info = infos[name]
        tag = f"[{i}/{len(splits)}] {name}"
        if name not in heads or "zero_shot" not in info:
            t0 = time.perf_counter()
            model.load_state_dict(pristine)
            heads[name] = _head(config, encoder, model, s, name)
            task = VisionTask(name, s.classes, heads[name], s, encoder, config.logit_scale, config.eval_batch_size)
            info["zero_shot"] = {"test": accuracy(model, task, "test")}
            info.setdefault("timings", {})["head_s"] = round(time.perf_counter() - t0, 2)
            with atomic_file(out / "heads.safetensors") as tmp:
                save_file({k: heads[k].contiguous() for k in sorted(heads)}, str(tmp), metadata={"logit_scale": str(config.logit_scale)})
            info.pop("finetuned", None)
            shutil.rmtree(out / name, ignore_errors=True)  # a new head makes an old fine-tune stale
            _write_json(out / MANIFEST, manifest)
        task = VisionTask(name, s.classes, heads[name], s, encoder, config.logit_scale, config.eval_batch_size)
        if (out / name / DONE).is_file() and "finetuned" in info:
            log(f"{tag}: cached (zero-shot {100 * info['zero_shot']['test']:.1f} %, fine-tuned {100 * info['finetuned']['test']:.1f} %)")
            continue
        model.load_state_dict(pristine)
        x, y = s.images("train"), s.labels("train")
        stats = finetune_images(model, encoder, heads[name], x, y, config, seed=info["seed"], progress=progress, desc=name)
        t0 = time.perf_counter()
        reestimate_on(model, encoder, [s.images("train")], config.bn_images, config.seed)  # precise BN
        info["finetuned"] = {"test": accuracy(model, task, "test")}
        info["timings"].update(train_s=stats.pop("train_s"), eval_s=round(time.perf_counter() - t0, 2))
        info["train"] = stats
        with atomic_dir(out / name) as tmp:
            encoder.save(model, tmp)
            _write_json(tmp / DONE, {"task": name, "splits_sha256": s.digest(), "encoder_sha256": encoder_sha, **stats})
        _write_json(out / MANIFEST, manifest)
        log(
            f"{tag}: zero-shot {100 * info['zero_shot']['test']:.1f} % -> fine-tuned {100 * info['finetuned']['test']:.1f} % "
            f"(train {info['timings']['train_s']:.0f} s, loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f})"
        )
    model.load_state_dict(pristine)
    manifest["timings"]["last_build_s"] = round(time.perf_counter() - t_build, 2)
    manifest["built_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_json(out / MANIFEST, manifest)
    return manifest


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


__all__ = ["build", "finetune_images", "state_sha256"]
