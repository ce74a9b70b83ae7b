"""Accuracy and logits of any encoder state on the benchmark tasks of a built run.

A run folder (``tvq bench build``) is self-contained: the pretrained model, the frozen heads
and the exact split texts are all in it, so evaluation needs neither the data cache nor the
packages. A "model" argument may be an ``nn.Module``, a state dict (missing keys are taken
from the pretrained model, so a merge may return only the encoder tensors it touched), or the
path of an HF folder or a ``.safetensors`` file.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from tvq.bench import BenchError
from tvq.bench.config import BenchConfig
from tvq.bench.data import Splits
from tvq.bench.fisher import task_fisher
from tvq.bench.model import collate, cosine_logits, encode, iter_batches, load_encoder, load_tokenizer, tokenize

ModelLike = nn.Module | Mapping[str, torch.Tensor] | str | Path
MANIFEST = "manifest.json"
RUN_FORMAT = "tvq-bench-run"


@dataclass
class BenchTask:
    """One task of a run: its classes, frozen head ``[C, D]`` and splits, plus how to tokenize."""

    name: str
    classes: list[str]
    head: torch.Tensor
    splits: Splits
    tokenizer: Any
    max_length: int
    logit_scale: float = 20.0
    eval_batch_size: int = 128
    run: BenchRun | None = None
    _ids: dict[str, list[list[int]]] = field(default_factory=dict, repr=False)

    def texts(self, split: str = "test") -> list[str]:
        return [t for t, _ in self.splits[split]]

    def labels(self, split: str = "test") -> torch.Tensor:
        return torch.tensor([y for _, y in self.splits[split]], dtype=torch.long)

    def token_ids(self, split: str = "test") -> list[list[int]]:
        """Tokenized once per split, reused by every evaluation."""
        if split not in self._ids:
            self._ids[split] = tokenize(self.tokenizer, self.texts(split), self.max_length)
        return self._ids[split]

    def batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """A padded batch of arbitrary texts, ready for ``encode``."""
        return collate(tokenize(self.tokenizer, texts, self.max_length), self.tokenizer.pad_token_id)

    def logits_of(self, model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``scale · cos`` logits; ``model`` may be a module or a functional_call wrapper."""
        return cosine_logits(encode(model, batch), self.head, self.logit_scale)


class BenchRun:
    """A built run folder: manifest, pretrained model, heads, splits.

    The text suite's run; other suites (``tvq.bench.vision``) subclass it, overriding ``suite``,
    ``make_config``, ``_template``, ``task`` and the evaluation methods. ``open_run`` picks the
    class from the manifest's ``suite``.
    """

    suite = "text"

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.manifest: dict[str, Any] = read_manifest(self.out)
        if self.manifest.get("suite", "text") != self.suite:
            raise BenchError(f"{self.out}: a {self.manifest.get('suite')!r} run, not a {self.suite!r} one; open it with tvq.bench.open_run")
        self.config = self.make_config(self.manifest["config"])
        self._tasks: dict[str, Any] = {}

    def make_config(self, data: dict[str, Any]) -> Any:
        return BenchConfig(**data)

    @property
    def tasks(self) -> list[str]:
        """Tasks whose fine-tuned model is complete."""
        return [t for t in self.manifest["tasks"] if "finetuned" in self.manifest["task_info"].get(t, {})]

    @property
    def pretrained_path(self) -> Path:
        return self.out / "pretrained"

    def finetuned_path(self, task: str) -> Path:
        if task not in self.tasks:
            raise BenchError(f"{self.out}: no fine-tuned model for task '{task}' (built: {', '.join(self.tasks)})")
        return self.out / task

    @cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.pretrained_path)

    @cached_property
    def heads(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "heads.safetensors"))

    @cached_property
    def _template(self) -> nn.Module:
        return load_encoder(self.pretrained_path)

    def task(self, name: str) -> BenchTask:
        if name not in self._tasks:
            info = self.manifest["task_info"].get(name)
            if info is None or name not in self.heads:
                raise BenchError(f"{self.out}: task '{name}' is not in this run (has {', '.join(self.manifest['tasks'])})")
            splits = Splits.load(self.out / info["splits"]["file"])
            c = self.config
            self._tasks[name] = BenchTask(
                name, splits.classes, self.heads[name], splits, self.tokenizer, c.max_length, c.logit_scale, c.eval_batch_size, self
            )
        return self._tasks[name]

    def load_model(self, source: ModelLike | None = None) -> nn.Module:
        """A fresh encoder module (eval mode): pretrained, or with ``source``'s tensors loaded."""
        model = copy.deepcopy(self._template)
        if source is None:
            return model
        if isinstance(source, nn.Module):
            state = source.state_dict()
        elif isinstance(source, Mapping):
            state = dict(source)
        else:
            state = read_state_dict(source)
        own = model.state_dict()
        unexpected = [k for k, v in state.items() if k not in own and v.is_floating_point()]
        if unexpected:
            raise BenchError(f"state dict has tensors the encoder does not: {', '.join(unexpected[:5])}")
        for k, v in state.items():
            if k in own and v.shape != own[k].shape:
                raise BenchError(f"tensor '{k}': shape {tuple(v.shape)}, the encoder has {tuple(own[k].shape)}")
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return model.eval()

    # -- what the grid (tvq.bench.matrix) calls; other suites override these -----------------
    def evaluate_all(self, model: ModelLike | None = None, split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Accuracy per task of ``model`` (None = pretrained; a module, state dict or path)."""
        return evaluate_all(model, self, split, tasks)

    def adamerging_inputs(
        self, tasks: Sequence[str] | None = None, *, batch_size: int = 16, split: str = "test", seed: int = 0
    ) -> tuple[Callable[[str, int], Any], Callable[[Callable[..., Any], str, Any], torch.Tensor]]:
        return adamerging_inputs(self, tasks, batch_size=batch_size, split=split, seed=seed)

    def adamerging_module(self) -> nn.Module:
        """The module AdaMerging runs merged parameters through (θ_pre, eval mode)."""
        return self.load_model()

    def task_fisher(self, task: str, split: str = "validation", examples: int = 32) -> dict[str, float]:
        return task_fisher(self, task, split, examples)


def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest of a run folder of any suite, checked to be one."""
    path = out / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: not a benchmark run ({exc}); build one with `tvq bench build`") from None
    if manifest.get("format") != RUN_FORMAT:
        raise BenchError(f"{path}: format is {manifest.get('format')!r}, expected {RUN_FORMAT!r}")
    return manifest


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an HF folder (``model.safetensors``) or of a ``.safetensors`` file."""
    p = Path(path)
    file = p / "model.safetensors" if p.is_dir() else p
    if not file.is_file():
        raise BenchError(f"{p}: no model.safetensors")
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- a reader, not a dict


def open_run(out: str | Path) -> BenchRun:
    """The run in ``out``, as the class of its suite (text or vision)."""
    if read_manifest(Path(out)).get("suite", "text") == "vision":
        vision_run: type[BenchRun] = import_module("tvq.bench.vision.run").VisionRun  # a suite built on this module
        return vision_run(out)
    return BenchRun(out)


def _as_module(model: ModelLike, task: BenchTask) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if task.run is None:
        raise BenchError(f"task '{task.name}': a state dict needs a run (use open_run(out).task(name))")
    return task.run.load_model(model)


def _resolve(task: BenchTask | str, run: BenchRun | None) -> BenchTask:
    if isinstance(task, BenchTask):
        return task
    if run is None:
        raise BenchError(f"task '{task}' given by name: pass run=open_run(out)")
    return run.task(task)


@torch.no_grad()
def predict_logits(model: ModelLike, task: BenchTask | str, split: str = "test", *, run: BenchRun | None = None) -> torch.Tensor:
    """``[N, C]`` logits for every example of ``split``, in split order (batched, length-sorted)."""
    t = _resolve(task, run)
    module = _as_module(model, t)
    was_training = module.training
    module.eval()
    ids = t.token_ids(split)
    out = torch.empty((len(ids), len(t.classes)))
    for idx, batch in iter_batches(ids, t.tokenizer.pad_token_id, t.eval_batch_size):
        out[idx] = t.logits_of(module, batch).float()
    module.train(was_training)
    return out


def evaluate(model: ModelLike, task: BenchTask | str, split: str = "test", *, run: BenchRun | None = None) -> float:
    """Accuracy in [0, 1] of ``model`` on one task's split."""
    t = _resolve(task, run)
    return float((predict_logits(model, t, split).argmax(-1) == t.labels(split)).float().mean())


def evaluate_all(model: ModelLike | None, run: BenchRun, split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy per task (the model is loaded once); add the mean yourself if you want it."""
    module = model if isinstance(model, nn.Module) else run.load_model(model)
    return {name: evaluate(module, run.task(name), split) for name in (tasks or run.tasks)}


def task_logits(model: nn.Module, task: BenchTask, texts: Sequence[str], *, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Differentiable logits for a batch of texts; with ``params``, run via ``functional_call``.

    This is the hook for losses on unlabeled data (e.g. AdaMerging's entropy): gradients flow
    into whatever produced ``params``; the module itself is not modified.
    """
    batch = task.batch(texts)
    if params is None:
        return task.logits_of(model, batch)
    return task.logits_of(lambda **kw: functional_call(model, dict(params), (), kw, strict=False), batch)


def adamerging_inputs(
    run: BenchRun, tasks: Sequence[str] | None = None, *, batch_size: int = 16, split: str = "test", seed: int = 0
) -> tuple[Callable[[str, int], dict[str, torch.Tensor]], Callable[[Callable[..., Any], str, Any], torch.Tensor]]:
    """``(batches, forward)`` for ``tvq.merge.adamerging.adamerging(run.load_model(), tvs, batches, forward=forward)``.

    ``batches(task, step)`` is a deterministic unlabeled batch of the task's ``split`` texts
    (labels are never used); ``forward(run_fn, task, batch)`` adds the task's frozen head.
    """
    bench = {name: run.task(name) for name in (tasks or run.tasks)}

    def batches(task: str, step: int) -> dict[str, torch.Tensor]:
        t = bench[task]
        ids = t.token_ids(split)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pick = torch.randperm(len(ids), generator=g)[:batch_size].tolist()
        return collate([ids[i] for i in pick], t.tokenizer.pad_token_id)

    def forward(run_fn: Callable[..., Any], task: str, batch: Any) -> torch.Tensor:
        return bench[task].logits_of(run_fn, batch)

    return batches, forward
