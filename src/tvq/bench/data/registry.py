"""Tasks as (text, label) lists: a registry of loaders, a converted-data cache, seeded splits.

A task is anything that can produce texts, integer labels and class names: the 8 built-in
package-backed tasks, a user's Python callable, or a JSONL file. Conversion runs once; the
result is cached as gzipped JSONL so later runs need neither the network nor the packages.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, Union

from tvq.bench import BenchDataError

Example = tuple[str, int]
LoaderResult = Union["TaskData", tuple[Sequence[str], Sequence[Any]], tuple[Sequence[str], Sequence[Any], Sequence[str]]]
Loader = Callable[[Path], LoaderResult]
CACHE_FORMAT = "tvq-bench-task"
SPLITS_FORMAT = "tvq-bench-splits"
SPLIT_ALIASES = {"validation": "val", "training": "train"}
RESERVED = {"pretrained", "splits", "heads", "manifest"}


@dataclass(frozen=True)
class TaskData:
    """A whole labelled task: ``labels[i]`` indexes ``classes``."""

    name: str
    texts: list[str]
    labels: list[int]
    classes: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self) -> list[int]:
        out = [0] * len(self.classes)
        for y in self.labels:
            out[y] += 1
        return out


@dataclass(frozen=True)
class TaskSpec:
    """How to obtain a task. ``load(cache_dir)`` may download into ``cache_dir``.

    ``load`` returns a :class:`TaskData`, or ``(texts, labels)`` / ``(texts, labels, classes)``
    with labels as ints (indices into ``classes``) or strings (class names). Bump ``version``
    when the conversion changes, so cached conversions are redone.
    """

    name: str
    load: Loader
    source: str = "user"
    version: int = 1
    cache: bool = True


class Named(Protocol):
    @property
    def name(self) -> str: ...


Spec = TypeVar("Spec", bound=Named)


class TaskRegistry(Generic[Spec]):
    """Task specs by name (one per suite). ``builtin`` imports the module that registers the
    built-in tasks, on first lookup (it builds on the registry's module, so it cannot be
    imported by it); ``hint`` says how to add a task, in the unknown-task error."""

    def __init__(self, kind: str, hint: str, builtin: str | None = None) -> None:
        self.kind, self.hint, self.builtin = kind, hint, builtin
        self._specs: dict[str, Spec] = {}

    def register(self, spec: Spec, *, replace: bool = False) -> Spec:
        _check_name(spec.name)
        if spec.name in self._specs and not replace:
            raise BenchDataError(f"{self.kind} '{spec.name}' is already registered (pass replace=True)")
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> Spec:
        self._load_builtin()
        if name not in self._specs:
            raise BenchDataError(f"unknown {self.kind} '{name}' (known: {', '.join(self._specs)}; {self.hint})")
        return self._specs[name]

    def names(self) -> list[str]:
        self._load_builtin()
        return list(self._specs)

    def _load_builtin(self) -> None:
        if self.builtin is not None:
            import_module(self.builtin)


def _check_name(name: str) -> None:
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name in RESERVED:
        raise BenchDataError(f"task name '{name}' is invalid (letters, digits, '_', '-'; not {sorted(RESERVED)})")


_TASKS: TaskRegistry[TaskSpec] = TaskRegistry("task", "or use name=file.jsonl")


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add a task to the registry so ``load_task(name)`` and ``--tasks name`` find it."""
    return _TASKS.register(spec, replace=replace)


def get_task(name: str) -> TaskSpec:
    """The registered spec; a ``name=path.jsonl`` string makes a JSONL task on the fly."""
    if "=" in name:
        task_name, path = name.split("=", 1)
        return jsonl_task(path, name=task_name)
    return _TASKS.get(name)


def list_tasks() -> list[str]:
    return _TASKS.names()


def jsonl_task(
    path: str | Path, name: str | None = None, *, text_key: str = "text", label_key: str = "label", classes: Sequence[str] | None = None
) -> TaskSpec:
    """A task read from a JSONL file (optionally .gz) of ``{"text": ..., "label": ...}`` lines."""
    p = Path(path)

    def load(_cache: Path) -> LoaderResult:
        if not p.is_file():
            raise BenchDataError(f"{p}: task file not found")
        texts, labels = [], []
        with (gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz" else open(p, encoding="utf-8")) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    texts.append(str(row[text_key]))
                    labels.append(row[label_key])
                except (ValueError, KeyError, TypeError) as exc:
                    raise BenchDataError(f"{p}:{n}: not a {{'{text_key}', '{label_key}'}} JSON line ({exc})") from None
        return (texts, labels, list(classes)) if classes is not None else (texts, labels)

    return TaskSpec(name or p.name.split(".")[0], load, source=f"file {p}", cache=False)


def default_cache_dir() -> Path:
    """``$TVQ_CACHE`` or ``~/.cache/tvq/bench``."""
    env = os.environ.get("TVQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tvq" / "bench"


def _coerce(spec: TaskSpec, out: LoaderResult) -> TaskData:
    """Accept the loader's result in any documented form and check it."""
    classes: list[str] | None
    labels: list[Any]
    if isinstance(out, TaskData):
        texts, labels, classes = out.texts, list(out.labels), out.classes
    elif isinstance(out, tuple) and len(out) in (2, 3):
        texts, labels = list(out[0]), list(out[1])
        classes = list(out[2]) if len(out) == 3 else None
        if labels and all(isinstance(y, str) for y in labels):
            classes = classes or sorted(set(labels))
            index = {c: i for i, c in enumerate(classes)}
            if missing := set(labels) - set(index):
                raise BenchDataError(f"task '{spec.name}': labels {sorted(missing)[:5]} are not in its classes")
            labels = [index[y] for y in labels]
        if classes is None:
            classes = [str(i) for i in range(max(map(int, labels), default=-1) + 1)]
    else:
        raise BenchDataError(f"task '{spec.name}': loader returned {type(out).__name__}, expected TaskData or (texts, labels[, classes])")
    labels = [int(y) for y in labels]
    if len(texts) != len(labels):
        raise BenchDataError(f"task '{spec.name}': {len(texts)} texts but {len(labels)} labels")
    if any(not 0 <= y < len(classes) for y in labels):
        raise BenchDataError(f"task '{spec.name}': a label is outside 0..{len(classes) - 1}")
    return TaskData(spec.name, [str(t) for t in texts], labels, [str(c) for c in classes], spec.source)


def _clean(data: TaskData) -> TaskData:
    """Strip texts, drop empty ones and exact duplicates (all copies when their labels disagree).

    Duplicates would leak test items into training; the first occurrence keeps its place, so
    the order (and hence the seeded split) stays deterministic.
    """
    seen: dict[str, int] = {}
    conflict: set[str] = set()
    for t, y in zip(data.texts, data.labels, strict=True):
        t = t.strip()
        if t and seen.setdefault(t, y) != y:
            conflict.add(t)
    texts, labels, kept = [], [], set()
    for t, y in zip(data.texts, data.labels, strict=True):
        t = t.strip()
        if t and t not in conflict and t not in kept:
            kept.add(t)
            texts.append(t)
            labels.append(y)
    return TaskData(data.name, texts, labels, data.classes, data.source)


def _write_jsonl_gz(path: Path, header: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    """Deterministic bytes (mtime 0), written under a temporary name then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
            for row in [header, *rows]:
                gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_jsonl_gz(path: Path, fmt: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            header = json.loads(f.readline())
            if header.get("format") != fmt:
                raise ValueError(f"format {header.get('format')!r}, expected {fmt!r}")
            return header, [json.loads(line) for line in f]
    except (OSError, ValueError, EOFError) as exc:
        raise BenchDataError(f"{path}: unreadable ({exc}); delete it to rebuild") from None


def load_task(task: str | TaskSpec, cache_dir: str | Path | None = None, *, refresh: bool = False) -> TaskData:
    """The cleaned task, converted once and cached at ``<cache>/data/<name>.v<version>.jsonl.gz``."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    _check_name(spec.name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "data" / f"{spec.name}.v{spec.version}.jsonl.gz"
    if spec.cache and path.is_file() and not refresh:
        header, rows = _read_jsonl_gz(path, CACHE_FORMAT)
        return TaskData(spec.name, [r["text"] for r in rows], [r["label"] for r in rows], header["classes"], header["source"])
    cache.mkdir(parents=True, exist_ok=True)
    data = _clean(_coerce(spec, spec.load(cache)))
    if len(data) == 0:
        raise BenchDataError(f"task '{spec.name}' ({spec.source}) has no examples")
    if spec.cache:
        header = {"format": CACHE_FORMAT, "name": spec.name, "classes": data.classes, "source": data.source, "version": spec.version, "n": len(data)}
        _write_jsonl_gz(path, header, [{"text": t, "label": y} for t, y in zip(data.texts, data.labels, strict=True)])
    return data


@dataclass(frozen=True)
class Splits:
    """Disjoint train / validation / test examples of one task."""

    name: str
    classes: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[Example]:
        split = SPLIT_ALIASES.get(split, split)
        if split not in ("train", "val", "test"):
            raise BenchDataError(f"unknown split '{split}' (train, val or validation, test)")
        return getattr(self, split)

    def sizes(self) -> dict[str, int]:
        return {s: len(self[s]) for s in ("train", "val", "test")}

    def digest(self) -> str:
        """sha256 of the classes and every example, to tell when cached results are stale."""
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for s in ("train", "val", "test"):
            h.update(f"\x00{s}\x00".encode())
            for t, y in self[s]:
                h.update(f"{y}\t{t}\n".encode())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        header = {"format": SPLITS_FORMAT, "name": self.name, "classes": self.classes, "sizes": self.sizes(), "info": self.info}
        rows = [{"split": s, "text": t, "label": y} for s in ("train", "val", "test") for t, y in self[s]]
        _write_jsonl_gz(path, header, rows)

    @classmethod
    def load(cls, path: Path) -> Splits:
        header, rows = _read_jsonl_gz(path, SPLITS_FORMAT)
        parts: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
        for r in rows:
            parts[r["split"]].append((r["text"], int(r["label"])))
        return cls(header["name"], header["classes"], parts["train"], parts["val"], parts["test"], header.get("info", {}))


def split_task(
    data: TaskData, *, seed: int = 0, train: int = 4000, val: int = 500, test: int = 1000, val_frac: float = 0.1, test_frac: float = 0.2
) -> Splits:
    """Seeded shuffle; test = min(test, 20 %), then val = min(val, 10 %), then train = next ≤ train.

    The order is a hash of (seed, index), so it does not depend on numpy/python RNG versions,
    and a larger ``train`` only appends examples (test and val do not move).
    """
    n = len(data)
    order = sorted(range(n), key=lambda i: hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest())
    n_test = min(test, int(n * test_frac))
    n_val = min(val, int(n * val_frac))
    n_train = min(train, n - n_test - n_val)
    pick = lambda idx: [(data.texts[i], data.labels[i]) for i in idx]  # noqa: E731
    info = {"seed": seed, "source": data.source, "n_total": n}
    return Splits(
        data.name,
        data.classes,
        train=pick(order[n_test + n_val : n_test + n_val + n_train]),
        val=pick(order[n_test : n_test + n_val]),
        test=pick(order[:n_test]),
        info=info,
    )
