"""Evaluating any encoder state on the vision tasks of a built run, with one rule for BatchNorm statistics.

A vision run folder is self-contained like a text one (pretrained encoder, heads, the exact split
images). ``VisionRun`` is a :class:`~tvq.bench.evaluate.BenchRun` with image tasks, so the grid
(``tvq.bench.matrix``), ``tvq bench eval`` and ``tvq bench fisher`` use it unchanged.

BatchNorm rule (``config.bn_stats``, default ``task``): running statistics are data, not weights,
so every model given as tensors (the pretrained one for zero-shot, a merge, θ_pre + a quantized
task vector, a saved checkpoint) gets fresh ones before any prediction, computed on
``bn_images`` unlabeled *training* images: for each task on that task's own images (``task``:
as the head and the fine-tuned model were built, so zero-shot and individual reproduce the
build's numbers), or once on images pooled over all evaluated tasks (``pooled``: one set of
statistics for one merged model). ``pretrained`` and ``merged`` keep the statistics the
tensors or the pretrained model hold. Modules passed in as objects are used as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from tvq.bench import BenchError
from tvq.bench.evaluate import BenchRun, ModelLike, read_state_dict
from tvq.bench.fisher import empirical_fisher
from tvq.bench.model import cosine_logits
from tvq.bench.vision.bn import norm_layers, reestimate, stat_keys, with_stats_from
from tvq.bench.vision.config import VisionConfig
from tvq.bench.vision.data import ImageSplits
from tvq.bench.vision.encoders import ImageEncoder, load_saved


@dataclass
class VisionTask:
    """One task of a run: classes, frozen head ``[C, D]``, split images, and the encoder's preprocessing."""

    name: str
    classes: list[str]
    head: torch.Tensor
    splits: ImageSplits
    encoder: ImageEncoder
    logit_scale: float = 20.0
    eval_batch_size: int = 128
    run: VisionRun | None = None

    def images(self, split: str = "test") -> np.ndarray:
        return self.splits.images(split)

    def labels(self, split: str = "test") -> torch.Tensor:
        return torch.from_numpy(self.splits.labels(split).astype(np.int64))

    def batch(self, images: np.ndarray) -> torch.Tensor:
        return self.encoder.pixels(images)

    def embed(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder.features(model, pixels).float(), dim=-1)

    def logits_of(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """``scale · cos`` logits; ``model`` may be a module or a functional_call wrapper."""
        return cosine_logits(self.embed(model, pixels), self.head, self.logit_scale)


@torch.no_grad()
def embed_images(model: nn.Module, encoder: ImageEncoder, images: np.ndarray, batch_size: int = 128) -> torch.Tensor:
    """Unit-norm features of ``images`` in order (eval mode, no grad)."""
    was = model.training
    model.eval()
    batches = (encoder.pixels(images[i : i + batch_size]) for i in range(0, len(images), batch_size))
    out = [F.normalize(encoder.features(model, x).float(), dim=-1) for x in batches]
    model.train(was)
    return torch.cat(out)


def bn_batches(encoder: ImageEncoder, image_sets: Sequence[np.ndarray], total: int, seed: int, batch_size: int = 64) -> list[torch.Tensor]:
    """``total`` images spread evenly over ``image_sets`` (the first of each: splits are already
    shuffled), preprocessed and shuffled with ``seed``: the unlabeled data BN statistics are estimated on."""
    per = math.ceil(total / len(image_sets))
    pixels = torch.cat([encoder.pixels(x[:per]) for x in image_sets])
    pixels = pixels[torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))]
    return [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]


def reestimate_on(model: nn.Module, encoder: ImageEncoder, image_sets: Sequence[np.ndarray], total: int, seed: int) -> nn.Module:
    """Re-estimate ``model``'s BN statistics on unlabeled images (see :func:`bn_batches`); returns it in eval mode."""
    reestimate(model, bn_batches(encoder, image_sets, total, seed), lambda m, x: encoder.features(m, x))
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, task: VisionTask, split: str = "test") -> torch.Tensor:
    """``[N, C]`` logits for every image of ``split``, in split order (batched)."""
    was = model.training
    model.eval()
    x = task.images(split)
    out = torch.cat([task.logits_of(model, task.batch(x[i : i + task.eval_batch_size])) for i in range(0, len(x), task.eval_batch_size)])
    model.train(was)
    return out.reshape(len(x), len(task.classes))


def accuracy(model: nn.Module, task: VisionTask, split: str = "test") -> float:
    return float((predict_logits(model, task, split).argmax(-1) == task.labels(split)).float().mean())


class VisionRun(BenchRun):
    """A built vision run folder: manifest, pretrained encoder, heads, split images."""

    suite = "vision"

    def __init__(self, out: Any, bn_stats: str | None = None) -> None:
        super().__init__(out)
        if bn_stats is not None:
            try:
                self.config = VisionConfig(**{**self.config.model_dump(), "bn_stats": bn_stats})
            except ValidationError:
                raise BenchError(f"bn_stats '{bn_stats}': expected task, pooled, pretrained or merged") from None

    def make_config(self, data: dict[str, Any]) -> VisionConfig:
        try:
            return VisionConfig(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise BenchError(f"{self.out}: manifest config {'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    @cached_property
    def _loaded(self) -> tuple[ImageEncoder, nn.Module]:
        return load_saved(self.pretrained_path)

    @property
    def encoder(self) -> ImageEncoder:
        return self._loaded[0]

    @cached_property
    def _template(self) -> nn.Module:
        return self._loaded[1]

    @property
    def tokenizer(self) -> Any:
        raise BenchError("a vision run has no tokenizer")

    def task(self, name: str) -> VisionTask:  # type: ignore[override]  # the suite's own task type
        if name not in self._tasks:
            info = self.manifest["task_info"].get(name)
            if info is None or name not in self.heads:
                raise BenchError(f"{self.out}: task '{name}' is not in this run (has {', '.join(self.manifest['tasks'])})")
            splits = ImageSplits.load(self.out / info["splits"]["file"])
            c = self.config
            self._tasks[name] = VisionTask(name, splits.classes, self.heads[name], splits, self.encoder, c.logit_scale, c.eval_batch_size, self)
        return self._tasks[name]

    # -- BatchNorm statistics ---------------------------------------------------------------
    def apply_bn_rule(self, module: nn.Module, tasks: Sequence[str]) -> nn.Module:
        """Give ``module`` running statistics by ``config.bn_stats`` (see the module docstring)."""
        rule = self.config.bn_stats
        if rule in ("task", "pooled"):
            reestimate_on(module, self.encoder, [self.task(t).images("train") for t in tasks], self.config.bn_images, self.config.seed)
        elif rule == "pretrained":
            keys = stat_keys(module)
            module.load_state_dict(with_stats_from(module.state_dict(), self._template.state_dict(), keys))
        return module.eval()

    def prepare(self, model: ModelLike | None, tasks: Sequence[str]) -> nn.Module:
        """A module ready to evaluate on ``tasks``: a module as given, or tensors (None = pretrained) + the BN rule."""
        if isinstance(model, nn.Module):
            return model
        if model is None:
            return self.apply_bn_rule(self.load_model(), tasks)
        state = dict(model) if isinstance(model, Mapping) else read_state_dict(model)
        return self.apply_bn_rule(self.load_model(state), tasks)

    # -- what the grid calls ----------------------------------------------------------------
    def evaluate_all(self, model: ModelLike | None = None, split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, float]:
        names = list(tasks or self.tasks)
        if self.config.bn_stats == "task" and not isinstance(model, nn.Module):
            return {name: accuracy(self.prepare(model, [name]), self.task(name), split) for name in names}
        module = self.prepare(model, names)
        return {name: accuracy(module, self.task(name), split) for name in names}

    def adamerging_inputs(
        self, tasks: Sequence[str] | None = None, *, batch_size: int = 16, split: str = "test", seed: int = 0
    ) -> tuple[Callable[[str, int], Any], Callable[[Callable[..., Any], str, Any], torch.Tensor]]:
        """``(batches, forward)`` for ``tvq.merge.adamerging``: deterministic unlabeled image batches, frozen heads."""
        bench = {name: self.task(name) for name in (tasks or self.tasks)}

        def batches(task: str, step: int) -> torch.Tensor:
            x = bench[task].images(split)
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            pick = torch.randperm(len(x), generator=g)[:batch_size].numpy()
            return bench[task].batch(x[np.sort(pick)])

        def forward(run_fn: Callable[..., Any], task: str, batch: Any) -> torch.Tensor:
            return bench[task].logits_of(run_fn, batch)

        return batches, forward

    def adamerging_module(self) -> nn.Module:
        """θ_pre with its BatchNorm layers in train mode: each unlabeled task batch is normalised with
        its own statistics while the coefficients are learned (the per-task rule's counterpart)."""
        module = self.load_model()
        for m in norm_layers(module).values():
            m.train()
        return module

    def task_fisher(self, task: str, split: str = "validation", examples: int = 32, seed: int = 0) -> dict[str, float]:
        """Mean per-element diagonal Fisher of each trained tensor of ``task``'s fine-tuned model (as the text suite's)."""
        t = self.task(task)
        x = t.images(split)[:examples]
        batches = [t.batch(x[i : i + 1]) for i in range(len(x))]
        return empirical_fisher(self.load_model(self.finetuned_path(task)).eval(), self.config.freeze, batches, t.logits_of, seed)
