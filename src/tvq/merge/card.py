"""The model card and the recipe a merged folder carries: ``README.md`` (YAML front matter
as ``huggingface_hub.ModelCard`` writes it: ``base_model``, ``tags``, ``library_name``, the
method with every option, the tasks and their packs' bits) and ``tvq_recipe.yml`` (tvq's
merge config that reproduces the folder, see ``tvq.merge.recipe``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from tvq.io.hub import hub_reference, parse_hub_id
from tvq.merge.plan import MergePlan
from tvq.merge.recipe import MERGEKIT_FILE, RECIPE_FILE, write_recipe
from tvq.pack.manifest import Method
from tvq.pack.reader import open_pack

TVQ_URL = "https://github.com/AIM-SKKU/TVQ"


@dataclass(frozen=True)
class TaskRecord:
    """One merged task: where its task vector came from, and at what precision."""

    name: str
    source: str  # "pack", "checkpoint" or "memory"
    path: str | None = None
    pack: Method | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "source": self.source}
        if self.path is not None:
            out["path"] = self.path
        if self.pack is not None:
            out["quantization"] = self.pack.label
            out["bits"] = self.pack.bits
            if self.pack.base_bits is not None:
                out["base_bits"] = self.pack.base_bits
        else:
            out["bits"] = 32
        return out


def task_records(origins: Mapping[str, tuple[str, str] | None]) -> list[TaskRecord]:
    """``task -> (kind, path)`` (None: in memory) -> records with each pack's method read once."""
    methods: dict[str, Method] = {}
    records = []
    for name, origin in origins.items():
        if origin is None:
            records.append(TaskRecord(name, "memory"))
            continue
        kind, path = origin
        if kind == "pack":
            if path not in methods:
                methods[path] = open_pack(path).manifest.method
            records.append(TaskRecord(name, "pack", path, methods[path]))
        else:
            records.append(TaskRecord(name, "checkpoint", path))
    return records


def base_model(pretrained: Path | None) -> str | None:
    """The card's ``base_model``: a hub model's repo id (the Hub links it), else the path given."""
    if pretrained is None:
        return None
    parsed = parse_hub_id(str(pretrained)) if hub_reference(pretrained) else None
    return parsed[0] if parsed is not None else str(pretrained)


def card_files(
    plan: MergePlan,
    tasks: list[TaskRecord],
    *,
    loadable: bool,
    mergekit_text: str | None = None,
    unified: tuple[Path, str] | None = None,
) -> dict[str, str]:
    """``README.md`` and ``tvq_recipe.yml`` (and the mergekit config it came from) for a merged folder.
    ``unified=(pack, task)``: one task's model from a unified EMR pack (``emr_task_files``)."""
    if unified is not None:
        return emr_task_files(plan, unified[0], unified[1], loadable=loadable)
    base = base_model(plan.pretrained)
    options = dict(plan.options)
    data = ModelCardData(
        base_model=base,
        library_name="transformers" if loadable else None,
        tags=["merge", "tvq", "task-vectors", str(plan.method)] + (["mergekit"] if mergekit_text is not None else []),
        merge_method=plan.method,
        tvq={"method": plan.method, "options": options, "tasks": [t.as_dict() for t in tasks], "dtype": plan.dtype or "same",
             **({"norm_stats": plan.norm_stats} if plan.norm_stats is not None else {}),
             **({"task": plan.task} if plan.task is not None else {})},
    )  # fmt: skip
    rows = "\n".join(
        f"| {t.name} | {t.source} | {t.pack.label if t.pack is not None else 'FP32'} | `{t.path or '-'}` |" for t in tasks
    )
    option_rows = "\n".join(f"| `{k}` | `{_inline(v)}` |" for k, v in options.items())
    recipe = write_recipe(plan)
    task_note = f" (the model of task `{plan.task}`)" if plan.task is not None else ""
    from_mergekit = f" (read from a mergekit config, kept as `{MERGEKIT_FILE}`)" if mergekit_text is not None else ""
    body = f"""# Merged model

Merged with [tvq]({TVQ_URL}) from the task vectors of {len(tasks)} task(s) on top of `{base}`,
with **{plan.method}**{task_note}{from_mergekit}.

## Method options

| option | value |
|---|---|
{option_rows or "| (none) | |"}

## Tasks

| task | source | precision | path |
|---|---|---|---|
{rows}

{reproduce(recipe, "the merge")}"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    files = {"README.md": str(card), RECIPE_FILE: recipe}
    if mergekit_text is not None:
        files[MERGEKIT_FILE] = mergekit_text
    return files


def reproduce(recipe: str, holds: str) -> str:
    """The cards' "Reproduce" section: the recipe beside the card, and the command that replays it."""
    return f"""## Reproduce

`{RECIPE_FILE}` beside this card holds {holds}; with the same inputs,

```
tvq merge --config {RECIPE_FILE} --out OUT
```

writes the same weights, byte for byte.

```yaml
{recipe.rstrip()}
```
"""


def emr_task_files(plan: MergePlan, unified: Path, task: str, *, loadable: bool) -> dict[str, str]:
    """The card and recipe of one task's model written from a unified EMR pack (``tvq merge
    --method emr --unified PACK --task NAME``): the merge it comes from is the pack's, so the
    recipe names the pack (``unified``) and the task, with no packs or method options."""
    base = base_model(plan.pretrained)
    extra = {"norm_stats": plan.norm_stats} if plan.norm_stats is not None else {}
    data = ModelCardData(
        base_model=base,
        library_name="transformers" if loadable else None,
        tags=["merge", "tvq", "task-vectors", "emr"],
        merge_method="emr",
        tvq={"method": "emr", "unified": str(unified), "task": task, "tasks": list(plan.tasks or []), "dtype": plan.dtype or "same", **extra},
    )
    recipe = write_recipe(replace(plan, method="emr", options={}, packs=[], finetuned={}, tasks=None, task=task, unified=unified))
    body = f"""# Merged model: task `{task}` of an EMR merge

Written with [tvq]({TVQ_URL}) from the unified EMR pack `{unified}` (tasks: {", ".join(plan.tasks or [])}):
θ_pre + λ_{task} (m_{task} ⊙ τ_uni) on top of `{base}`, with the task's own running statistics unless
`norm_stats` says otherwise.

{reproduce(recipe, "the recipe")}"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return {"README.md": str(card), RECIPE_FILE: recipe}


def _inline(value: Any) -> str:
    """A value as one line of YAML (``0.3``, ``true``, ``{a: 1, b: 0.5}``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def write_files(folder: Path, files: Mapping[str, str]) -> None:
    """Write small text files into ``folder`` (a merge's temporary folder: atomic with it)."""
    for name, text in files.items():
        (folder / name).write_text(text)
