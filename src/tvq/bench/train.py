"""Build a benchmark run: splits, pretrained copy, frozen heads, one fine-tuned encoder per task.

Layout of ``<out>/``::

    manifest.json            tasks, config, seeds, split sizes and hashes, accuracies, timings
    pretrained/              the pretrained encoder as an HF folder (full model.safetensors)
    <task>/                  the fine-tuned encoder, same keys as pretrained/model.safetensors
    heads.safetensors        one frozen [classes, dim] head per task (key = task name)
    splits/<task>.jsonl.gz   the exact train/val/test examples

Every step is cached and atomic (``tvq.bench.building``, shared with the vision suite): a task
folder appears (by rename) only once complete, so an interrupted build resumes where it stopped;
outputs built with other settings are refused.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tvq.bench.building import Log, build_tasks, check_reuse, fit, previous_manifest, record_task_splits, run_folder, steps_for
from tvq.bench.config import BenchConfig
from tvq.bench.data import Splits, get_task, load_task, split_task
from tvq.bench.evaluate import RUN_FORMAT, BenchTask, predict_logits
from tvq.bench.model import (
    class_mean_head,
    collate,
    cosine_logits,
    embed,
    encode,
    length_batches,
    load_encoder,
    load_tokenizer,
    resolve_model_path,
    save_encoder,
    tokenize,
)
from tvq.io.safetensors_writer import sha256_file


def finetune(
    model: nn.Module,
    tokenizer: Any,
    head: torch.Tensor,
    examples: Sequence[tuple[str, int]],
    config: BenchConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
    """Fine-tune ``model`` in place on ``examples`` against the frozen ``head``.

    Cross-entropy on ``logit_scale · cos``; parameters whose name contains a ``config.freeze``
    pattern stay fixed; AdamW with a one-cycle schedule (``config.warmup`` warm-up, betas
    not cycled); length-bucketed batches with dynamic padding; dropout on. The global RNG is
    left untouched (``fork_rng``), so results depend only on ``seed``.
    """
    ids = tokenize(tokenizer, [t for t, _ in examples], config.max_length)
    labels = torch.tensor([y for _, y in examples], dtype=torch.long)
    lengths = [len(x) for x in ids]

    def loss_of(idx: list[int]) -> torch.Tensor:
        batch = collate([ids[i] for i in idx], tokenizer.pad_token_id)
        return F.cross_entropy(cosine_logits(encode(model, batch), head, config.logit_scale), labels[idx])

    steps = steps_for(len(ids), config.batch_size, config.epochs)
    return fit(model, config, steps, lambda g: length_batches(lengths, config.batch_size, g), loss_of, seed=seed, progress=progress, desc=desc)


class TextSteps:
    """The text suite's steps of a build (``tvq.bench.building.SuiteSteps``)."""

    def __init__(self, config: BenchConfig, model_dir: Path, tokenizer: Any) -> None:
        self.config, self.model_dir, self.tokenizer = config, model_dir, tokenizer

    def head(self, model: nn.Module, name: str, splits: Splits) -> torch.Tensor:
        c = self.config
        emb = embed(model, self.tokenizer, [t for t, _ in splits.train], c.max_length, c.eval_batch_size)
        return class_mean_head(emb, [y for _, y in splits.train], len(splits.classes), name)

    def accuracy(self, model: nn.Module, name: str, splits: Splits, head: torch.Tensor) -> float:
        c = self.config
        task = BenchTask(name, splits.classes, head, splits, self.tokenizer, c.max_length, c.logit_scale, c.eval_batch_size)
        return float((predict_logits(model, task).argmax(-1) == task.labels("test")).float().mean())

    def finetune(self, model: nn.Module, name: str, splits: Splits, head: torch.Tensor, seed: int, progress: bool) -> dict[str, Any]:
        return finetune(model, self.tokenizer, head, splits.train, self.config, seed=seed, progress=progress, desc=name)

    def save(self, model: nn.Module, folder: Path) -> None:
        save_encoder(model, self.model_dir, folder)


def build(
    config: BenchConfig,
    out: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    log: Log | None = None,
) -> dict[str, Any]:
    """Build (or finish building) the run in ``out``; returns the manifest.

    ``out`` defaults to ``<cache>/runs/<preset>``. Tasks already complete with the same
    settings and the same split are skipped; ``force`` rebuilds a folder made with other settings.
    """
    log = log or (lambda s: tqdm.write(s))
    out, cache = run_folder(out, cache_dir, config.preset)
    t_build = time.perf_counter()
    model_dir = resolve_model_path(config.encoder)
    encoder_sha = sha256_file(model_dir / "model.safetensors")
    manifest = check_reuse(out, previous_manifest(out), config, encoder_sha, force)

    # data first: a missing package fails before any slow step
    splits: dict[str, Splits] = {}
    for name in config.tasks:
        spec = get_task(name)
        data = load_task(spec, cache)
        splits[spec.name] = split_task(data, seed=config.seed, train=config.train_size, val=config.val_size, test=config.test_size)
    prior = list(manifest.get("tasks", []))
    manifest.update(
        format=RUN_FORMAT,
        version=1,
        preset=config.preset,
        config=config.model_dump(),
        encoder={"path": str(model_dir), "sha256": encoder_sha},
        tasks=prior + [t for t in splits if t not in prior],
        environment={
            "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"),
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
    )
    record_task_splits(out, manifest, splits, config.seed, force, ".jsonl.gz")
    t0 = time.perf_counter()
    model = load_encoder(model_dir)
    tokenizer = load_tokenizer(model_dir)
    manifest.setdefault("timings", {})["load_s"] = round(time.perf_counter() - t0, 2)
    steps = TextSteps(config, model_dir, tokenizer)
    return build_tasks(out, manifest, splits, model, encoder_sha, steps, progress=progress, log=log, t_build=t_build)
