"""Building a benchmark run folder, the same way for every suite (text, vision).

A suite says how to make a head, score a model, fine-tune and save an encoder (a
:class:`SuiteSteps`); this module owns the rest: the run folder's manifest and its reuse rules,
the recorded splits, the fine-tuning loop, and the per-task steps, each cached and atomic (a
task folder appears, by rename, only once complete), so an interrupted build resumes where it
stopped and outputs built with other settings are refused.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from tvq.bench import BenchError
from tvq.bench.config import TrainingConfig
from tvq.bench.data import default_cache_dir
from tvq.bench.evaluate import MANIFEST, RUN_FORMAT
from tvq.io.atomic import atomic_dir, atomic_file

DONE = "bench_done.json"
HEADS = "heads.safetensors"
Log = Callable[[str], None]
Batch = TypeVar("Batch")


def run_folder(out: str | Path | None, cache_dir: str | Path | None, default_name: str) -> tuple[Path, Path]:
    """The run folder (created; default ``<cache>/runs/<default_name>``) and the data cache."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = Path(out) if out is not None else cache / "runs" / default_name
    folder.mkdir(parents=True, exist_ok=True)
    return folder, cache


def task_seed(seed: int, task: str) -> int:
    """A per-task seed that does not depend on the task's position in the list."""
    return zlib.crc32(f"{seed}:{task}".encode())


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a reader never sees half a manifest)."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1) + "\n")


def previous_manifest(out: Path) -> dict[str, Any]:
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


def check_reuse(out: Path, old: dict[str, Any], config: TrainingConfig, encoder_sha: str, force: bool, suite: str = "text") -> dict[str, Any]:
    """The previous manifest if it was built the same way; with ``force``, a clean folder.

    A folder of another suite is refused."""
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
    (out / HEADS).unlink(missing_ok=True)
    return {}


def record_task_splits(
    out: Path, manifest: dict[str, Any], splits: Mapping[str, Any], seed: int, force: bool, suffix: str, **extra_keys: Any
) -> dict[str, Any]:
    """Save each task's splits under ``out/splits`` and record them in the run manifest (its
    ``task_info``, returned). A task whose data changed since it was built is refused (or, with
    ``force``, started afresh); ``extra_keys`` names split-info fields to record too, with their
    defaults (e.g. ``grouped=False``)."""
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


def fit(
    model: nn.Module,
    config: TrainingConfig,
    steps: int,
    epoch_batches: Callable[[torch.Generator], Iterable[Batch]],
    loss_of: Callable[[Batch], torch.Tensor],
    *,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
    """Fine-tune ``model`` in place: AdamW with a one-cycle schedule over ``steps`` steps.

    ``epoch_batches(generator)`` gives one epoch's batches, ``loss_of(batch)`` their loss (the
    suite's forward pass against its frozen head). Parameters whose name contains a
    ``config.freeze`` pattern stay fixed; the model trains in train mode (dropout, BatchNorm
    batch statistics). The global RNG is left untouched (``fork_rng``), so results depend only
    on ``seed``."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(not any(f in name for f in config.freeze))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=config.warmup, cycle_momentum=False)
    losses: list[float] = []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), tqdm(total=steps, desc=desc, disable=not progress, leave=False, unit="step") as bar:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(config.epochs):
            for batch in epoch_batches(g):
                loss = loss_of(batch)
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


def steps_for(examples: int, batch_size: int, epochs: int, min_batch: int = 1) -> int:
    """Optimizer steps of ``epochs`` passes in batches of ``batch_size``; a last batch smaller
    than ``min_batch`` is dropped (BatchNorm needs two examples)."""
    full, rest = divmod(examples, batch_size)
    return max((full + (1 if rest >= min_batch else 0)) * epochs, 1)


class SuiteSteps(Protocol):
    """What a suite does for one task of a build; ``splits`` is the suite's own splits type."""

    def head(self, model: nn.Module, name: str, splits: Any) -> torch.Tensor:
        """The frozen head of task ``name``, from the pretrained ``model``."""
        ...

    def accuracy(self, model: nn.Module, name: str, splits: Any, head: torch.Tensor) -> float:
        """Test accuracy of ``model`` as it is."""
        ...

    def finetune(self, model: nn.Module, name: str, splits: Any, head: torch.Tensor, seed: int, progress: bool) -> dict[str, Any]:
        """Fine-tune ``model`` in place and leave it ready to evaluate and save; returns training stats."""
        ...

    def save(self, model: nn.Module, folder: Path) -> None:
        """Write ``model`` as an encoder folder."""
        ...


def build_tasks(
    out: Path,
    manifest: dict[str, Any],
    splits: Mapping[str, Any],
    model: nn.Module,
    encoder_sha: str,
    steps: SuiteSteps,
    *,
    progress: bool,
    log: Log,
    t_build: float,
) -> dict[str, Any]:
    """The cached steps of a build after its manifest and splits are recorded: the pretrained
    folder, then per task its head and zero-shot score, its fine-tune and score; returns the
    manifest, written after every step. ``model`` holds the pretrained weights and gets them
    back at the end."""
    infos = manifest["task_info"]
    heads_meta = {"logit_scale": str(manifest["config"]["logit_scale"])}
    write_json(out / MANIFEST, manifest)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    if not (out / "pretrained" / DONE).is_file():
        with atomic_dir(out / "pretrained") as tmp:
            steps.save(model, tmp)
            write_json(tmp / DONE, {"sha256": encoder_sha})
    heads: dict[str, torch.Tensor] = {}
    if (out / HEADS).is_file():
        with safe_open(str(out / HEADS), "pt") as f:
            heads = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- a reader, not a dict
    for i, (name, s) in enumerate(splits.items(), 1):
        info = infos[name]
        tag = f"[{i}/{len(splits)}] {name}"
        if name not in heads or "zero_shot" not in info:
            t0 = time.perf_counter()
            model.load_state_dict(pristine)
            heads[name] = steps.head(model, name, s)
            info["zero_shot"] = {"test": steps.accuracy(model, name, s, heads[name])}
            info.setdefault("timings", {})["head_s"] = round(time.perf_counter() - t0, 2)
            with atomic_file(out / HEADS) as tmp:
                save_file({k: heads[k].contiguous() for k in sorted(heads)}, str(tmp), metadata=heads_meta)
            info.pop("finetuned", None)
            shutil.rmtree(out / name, ignore_errors=True)  # a new head makes an old fine-tune stale
            write_json(out / MANIFEST, manifest)
        if (out / name / DONE).is_file() and "finetuned" in info:
            log(f"{tag}: cached (zero-shot {100 * info['zero_shot']['test']:.1f} %, fine-tuned {100 * info['finetuned']['test']:.1f} %)")
            continue
        model.load_state_dict(pristine)
        stats = steps.finetune(model, name, s, heads[name], info["seed"], progress)
        t0 = time.perf_counter()
        info["finetuned"] = {"test": steps.accuracy(model, name, s, heads[name])}
        info["timings"].update(train_s=stats.pop("train_s"), eval_s=round(time.perf_counter() - t0, 2))
        info["train"] = stats
        with atomic_dir(out / name) as tmp:
            steps.save(model, tmp)
            write_json(tmp / DONE, {"task": name, "splits_sha256": s.digest(), "encoder_sha256": encoder_sha, **stats})
        write_json(out / MANIFEST, manifest)
        log(
            f"{tag}: zero-shot {100 * info['zero_shot']['test']:.1f} % -> fine-tuned {100 * info['finetuned']['test']:.1f} % "
            f"(train {info['timings']['train_s']:.0f} s, loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f})"
        )
    model.load_state_dict(pristine)
    manifest["timings"]["last_build_s"] = round(time.perf_counter() - t_build, 2)
    manifest["built_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(out / MANIFEST, manifest)
    return manifest
