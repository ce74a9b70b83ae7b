"""Vision-suite settings: one validated config with ``full`` and ``ci`` presets (as ``tvq.bench.config``)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tvq.bench.config import TrainingConfig, make_preset

ALL_TASKS = ["mnist", "digits", "fashion", "animals", "icons", "glyphs"]
CI_TASKS = ["mnist", "digits", "animals"]
BnStats = Literal["task", "pooled", "pretrained", "merged"]


class VisionConfig(TrainingConfig):
    """Everything that determines the vision fine-tunes, plus how merged models get BN statistics.

    Defaults are the ``full`` preset: EfficientNet-Lite0 at 64 px, 3,000 train / 300 val /
    1,000 test per task, batch 32, 2 epochs, AdamW lr 1e-3 with a one-cycle schedule (10 %
    warm-up), every parameter trained with BatchNorm in train mode, frozen class-mean heads,
    logit scale 20.

    BatchNorm statistics are treated as data, not weights, everywhere: the class-mean head is
    built from pretrained features with statistics estimated on the task's own training images
    (so fine-tuning in train mode starts from features that match its head), and a fine-tuned
    model's statistics are re-estimated on those images after training ("precise BN": running
    averages with momentum lag behind the weights). ``bn_images`` unlabeled training images are
    used each time.

    ``bn_stats`` (evaluation only) is how a model rebuilt from tensors (zero-shot, a merge, a
    quantized task vector, a checkpoint) gets its statistics, the same way for every method and
    precision: ``task`` (default) re-estimated for each task on that task's training images, as
    its head and its fine-tuned model were (the task is known at inference, as its head is);
    ``pooled``: once for one merged model, on training images of all its tasks; ``pretrained``:
    the pretrained model's (ImageNet); ``merged``: whatever the tensors hold (for a merge, what
    the merge engine produced: statistics merged as weights before issue 14's fix, the pretrained
    ones with its default; for comparison only).
    """

    EVALUATION_ONLY: ClassVar[frozenset[str]] = TrainingConfig.EVALUATION_ONLY | {"bn_stats", "bn_images"}

    tasks: list[str] = Field(default_factory=lambda: list(ALL_TASKS))
    encoder: str | None = Field(None, description="None = EfficientNet-Lite0; an HF CLIP folder; or KIND[:ARG] of a registered encoder")
    image_size: int | None = Field(64, gt=7, description="input side in px; None = the encoder's own")
    head: Literal["class_mean", "text"] = "class_mean"
    train_size: int = Field(3000, gt=0)
    val_size: int = Field(300, ge=0)
    test_size: int = Field(1000, gt=0)
    batch_size: int = Field(32, gt=1)
    lr: float = Field(1e-3, gt=0)
    bn_stats: BnStats = "task"
    bn_images: int = Field(512, gt=0)


PRESETS: dict[str, dict[str, Any]] = {
    "full": {"preset": "full", "tasks": ALL_TASKS},
    "ci": {"preset": "ci", "tasks": CI_TASKS, "train_size": 384, "val_size": 64, "test_size": 200, "epochs": 2, "image_size": 48, "bn_images": 256},
}


def preset(name: str = "full", **overrides: Any) -> VisionConfig:
    """A preset with some fields replaced, e.g. ``preset("ci", tasks=["digits"], seed=1)``."""
    return make_preset(VisionConfig, PRESETS, name, overrides, label="vision preset")
