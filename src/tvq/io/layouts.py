"""The paper's checkpoint layout (task_vectors, and every paper after it: TIES, AdaMerging, EMR,
TVQ, LiNeS, TALL): one folder per model, the pretrained image encoder beside one folder per task.

```
checkpoints/ViT-B-32/
    zeroshot.pt          the pretrained model (torch.save of the whole module)
    Cars/finetuned.pt    each task's fine-tuned model (its folder may hold a zeroshot.pt too)
    DTD/finetuned.pt
    ...
```

A task folder names its ``finetuned.pt``; :func:`task_folders` lists a model folder's tasks.
Names come from the file system the user pointed at; each one is still checked like a name
from a stranger's file (:mod:`tvq.io.paths`): a plain component, and a task folder or file
reached through a symlink must stay inside the model folder.
"""

from __future__ import annotations

from pathlib import Path

from tvq.errors import CheckpointError, ConfigError, where
from tvq.io.paths import confined, name_problem

FINETUNED_FILE = "finetuned.pt"
PRETRAINED_FILE = "zeroshot.pt"
MAX_TASKS = 4096


def official_file(folder: Path) -> Path | None:
    """The checkpoint a folder of the official layout stands for: a task folder's
    ``finetuned.pt``, else a model folder's ``zeroshot.pt``; None for other folders."""
    for name in (FINETUNED_FILE, PRETRAINED_FILE):
        if (folder / name).exists() or (folder / name).is_symlink():
            return confined(folder, name, folder, error=CheckpointError)
    return None


def task_folders(root: str | Path) -> dict[str, Path]:
    """Task name -> task folder for every subfolder of ``root`` holding a ``finetuned.pt``, by
    name; refused when there is none (one line naming the folder and what it holds)."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{where(root)}: not a folder (expected a model folder such as checkpoints/ViT-B-32)")
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if not (entry / FINETUNED_FILE).exists():
            continue
        problem = name_problem(entry.name)
        if problem is not None:
            raise CheckpointError(f"{where(root)}: task folder {problem}")
        confined(root, f"{entry.name}/{FINETUNED_FILE}", root, error=CheckpointError)
        found[entry.name] = entry
        if len(found) > MAX_TASKS:
            raise CheckpointError(f"{where(root)}: more than {MAX_TASKS} task folders")
    if not found:
        raise CheckpointError(f"{where(root)}: no task folder holding {FINETUNED_FILE} (the layout is {root}/<Task>/{FINETUNED_FILE})")
    return found


def with_task_folders(named: dict[str, Path], root: str | Path | None) -> dict[str, Path]:
    """``-f NAME=PATH`` tasks plus every task folder of ``root`` (``--tasks-from``), in that
    order; a name given both ways is an error, and so is no task at all."""
    found = task_folders(root) if root is not None else {}
    twice = sorted(set(named) & set(found))
    if twice:
        raise ConfigError(f"--tasks-from {root}: task {twice[0]!r} is also given with --finetuned")
    if not named and not found:
        raise ConfigError("no fine-tuned checkpoints: pass --finetuned NAME=PATH (repeat per task) or --tasks-from MODEL_FOLDER")
    return {**named, **found}
