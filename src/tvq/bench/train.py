"""Build a benchmark run: splits, pretrained copy, frozen heads, one fine-tuned encoder per task.

Layout of ``<out>/``::

    manifest.json            tasks, config, seeds, split sizes and hashes, accuracies, timings
    pretrained/              the pretrained encoder as an HF folder (full model.safetensors)
    <task>/                  the fine-tuned encoder, same keys as pretrained/model.safetensors
    heads.safetensors        one frozen [classes, dim] head per task (key = task name)
    splits/<task>.jsonl.gz   the exact train/val/test examples

Every step is cached and atomic: a task folder appears (by rename) only once complete, so an
interrupted build resumes where it stopped; outputs built with other settings are refused.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import shutil
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from tvq.bench import BenchError
from tvq.bench.config import BenchConfig
from tvq.bench.data import Splits, default_cache_dir, get_task, load_task, split_task
from tvq.bench.evaluate import MANIFEST, RUN_FORMAT, BenchTask, predict_logits
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
from tvq.io.atomic import atomic_dir, atomic_file
from tvq.io.safetensors_writer import sha256_file

DONE = "bench_done.json"
Log = Callable[[str], None]


def task_seed(seed: int, task: str) -> int:
    """A per-task seed that does not depend on the task's position in the list."""
    return zlib.crc32(f"{seed}:{task}".encode())


def record_task_splits(
    out: Path, manifest: dict[str, Any], splits: Mapping[str, Any], seed: int, force: bool, suffix: str, **extra_keys: Any
) -> dict[str, Any]:
    """Save each task's splits under ``out/splits`` and record them in the run manifest (its
    ``task_info``, returned). A task
    whose data changed since it was built is refused (or, with ``force``, started afresh);
    ``extra_keys`` names split-info fields to record too, with their defaults (e.g.
    ``grouped=False``). Shared by the suites."""
    infos: dict[str, Any] = manifest.setdefault("task_info", {})
    for name, s in splits.items():
        info = infos.get(name, {})
        if info.get("splits", {}).get("sha256") != s.digest():
            if "finetuned" in info and not force:
                raise BenchError(f"{out}: the data of task '{name}' changed since it was built; use another --out or pass --force")
            info = {}
            shutil.rmtree(out / name, ignore_errors=True)
        s.save(out / "splits" / f"{name}{suffix}")
        recorded = {"file": f"splits/{name}{suffix}", "sizes": s.sizes(), "sha256": s.digest(), "seed": seed, "n_total": s.info.get("n_total")}
        recorded.update({key: s.info.get(key, default) for key, default in extra_keys.items()})
        info.update(classes=s.classes, source=s.info.get("source", ""), seed=task_seed(seed, name), splits=recorded)
        infos[name] = info
    return infos


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
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(not any(f in name for f in config.freeze))
    params = [p for p in model.parameters() if p.requires_grad]
    ids = tokenize(tokenizer, [t for t, _ in examples], config.max_length)
    labels = torch.tensor([y for _, y in examples], dtype=torch.long)
    lengths = [len(x) for x in ids]
    steps = math.ceil(len(ids) / config.batch_size) * config.epochs
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=config.warmup, cycle_momentum=False)
    losses: list[float] = []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), tqdm(total=steps, desc=desc, disable=not progress, leave=False, unit="step") as bar:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(config.epochs):
            for idx in length_batches(lengths, config.batch_size, g):
                batch = collate([ids[i] for i in idx], tokenizer.pad_token_id)
                loss = F.cross_entropy(cosine_logits(encode(model, batch), head, config.logit_scale), labels[idx])
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
    return {
        "steps": steps,
        "train_s": round(time.perf_counter() - t0, 2),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trainable": sum(p.numel() for p in params),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1) + "\n")


def _accuracy(logits: torch.Tensor, task: BenchTask, split: str) -> float:
    return float((logits.argmax(-1) == task.labels(split)).float().mean())


def _previous(out: Path) -> dict[str, Any]:
    """The manifest of an earlier build in ``out``; refuse folders that are something else."""
    path = out / MANIFEST
    if not path.is_file():
        if any(out.iterdir()):
            raise BenchError(f"{out} exists and is not a benchmark run folder; choose an empty or new --out")
        return {}
    try:
        old = json.loads(path.read_text())
    except ValueError as exc:
        raise BenchError(f"{path}: unreadable ({exc}); delete the folder to rebuild") from None
    if old.get("format") != RUN_FORMAT:
        raise BenchError(f"{out} holds a {old.get('format', 'non-benchmark')!r} manifest, not a benchmark run; choose another --out")
    return old


def _check_reuse(out: Path, old: dict[str, Any], config: Any, encoder_sha: str, force: bool, suite: str = "text") -> dict[str, Any]:
    """The previous manifest if it was built the same way; with ``force``, a clean folder.

    ``config`` is the suite's config (``BenchConfig`` or ``VisionConfig``); a folder of another suite is refused.
    """
    if not old:
        return {}
    if old.get("suite", "text") != suite:
        raise BenchError(f"{out} holds a {old.get('suite', 'text')!r} benchmark run, not a {suite!r} one; choose another --out")
    cls = type(config)
    same = old.get("config", {}) and cls(**old["config"]).training_fields() == config.training_fields()
    if same and old.get("encoder", {}).get("sha256") == encoder_sha:
        return old
    if not force:
        before, now = cls(**old["config"]).training_fields(), config.training_fields()
        diff = ", ".join(f"{k}: {before[k]} -> {now[k]}" for k in now if before.get(k) != now[k]) or "the pretrained encoder changed"
        raise BenchError(f"{out} was built with other settings ({diff}); use another --out or pass --force to rebuild it")
    for name in [*old.get("tasks", []), "pretrained", "splits"]:
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "heads.safetensors").unlink(missing_ok=True)
    return {}


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
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = Path(out) if out is not None else cache / "runs" / config.preset
    out.mkdir(parents=True, exist_ok=True)
    t_build = time.perf_counter()
    model_dir = resolve_model_path(config.encoder)
    encoder_sha = sha256_file(model_dir / "model.safetensors")
    manifest = _check_reuse(out, _previous(out), config, encoder_sha, force)

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
    infos = record_task_splits(out, manifest, splits, config.seed, force, ".jsonl.gz")
    _write_json(out / MANIFEST, manifest)

    t0 = time.perf_counter()
    model = load_encoder(model_dir)
    tokenizer = load_tokenizer(model_dir)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    if not (out / "pretrained" / DONE).is_file():
        with atomic_dir(out / "pretrained") as tmp:
            save_encoder(model, model_dir, tmp)
            _write_json(tmp / DONE, {"sha256": encoder_sha})
    manifest.setdefault("timings", {})["load_s"] = round(time.perf_counter() - t0, 2)

    heads: dict[str, torch.Tensor] = {}
    if (out / "heads.safetensors").is_file():
        with safe_open(str(out / "heads.safetensors"), "pt") as f:
            heads = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- a reader, not a dict
    for i, (name, s) in enumerate(splits.items(), 1):
        info = infos[name]
        tag = f"[{i}/{len(splits)}] {name}"
        if name not in heads or "zero_shot" not in info:
            t0 = time.perf_counter()
            model.load_state_dict(pristine)
            emb = embed(model, tokenizer, [t for t, _ in s.train], config.max_length, config.eval_batch_size)
            heads[name] = class_mean_head(emb, [y for _, y in s.train], len(s.classes), name)
            task = BenchTask(name, s.classes, heads[name], s, tokenizer, config.max_length, config.logit_scale, config.eval_batch_size)
            info["zero_shot"] = {"test": _accuracy(predict_logits(model, task), task, "test")}
            info.setdefault("timings", {})["head_s"] = round(time.perf_counter() - t0, 2)
            with atomic_file(out / "heads.safetensors") as tmp:
                save_file({k: heads[k].contiguous() for k in sorted(heads)}, str(tmp), metadata={"logit_scale": str(config.logit_scale)})
            info.pop("finetuned", None)
            shutil.rmtree(out / name, ignore_errors=True)  # a new head makes an old fine-tune stale
            _write_json(out / MANIFEST, manifest)
        task = BenchTask(name, s.classes, heads[name], s, tokenizer, config.max_length, config.logit_scale, config.eval_batch_size)
        if (out / name / DONE).is_file() and "finetuned" in info:
            log(f"{tag}: cached (zero-shot {100 * info['zero_shot']['test']:.1f} %, fine-tuned {100 * info['finetuned']['test']:.1f} %)")
            continue
        model.load_state_dict(pristine)
        stats = finetune(model, tokenizer, heads[name], s.train, config, seed=info["seed"], progress=progress, desc=name)
        t0 = time.perf_counter()
        info["finetuned"] = {"test": _accuracy(predict_logits(model, task), task, "test")}
        info["timings"].update(train_s=stats.pop("train_s"), eval_s=round(time.perf_counter() - t0, 2))
        info["train"] = stats
        with atomic_dir(out / name) as tmp:
            save_encoder(model, model_dir, tmp)
            _write_json(tmp / DONE, {"task": name, "splits_sha256": s.digest(), "encoder_sha256": encoder_sha, **stats})
        _write_json(out / MANIFEST, manifest)
        log(
            f"{tag}: zero-shot {100 * info['zero_shot']['test']:.1f} % -> fine-tuned {100 * info['finetuned']['test']:.1f} % "
            f"(train {info['timings']['train_s']:.0f} s, loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f})"
        )

    manifest["timings"]["last_build_s"] = round(time.perf_counter() - t_build, 2)
    manifest["built_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_json(out / MANIFEST, manifest)
    return manifest
