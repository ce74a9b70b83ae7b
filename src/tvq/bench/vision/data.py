"""Image tasks as uint8 arrays: a registry of loaders, a converted-data cache, seeded (grouped) splits.

The image counterpart of ``tvq.bench.data``: a loader turns a package's files into
``ImageData`` once; the result is cached as ``<cache>/vision/<name>.v<version>.npz`` so later
runs need neither the packages nor the conversion. Images stay at their native size (resizing
is part of the model's preprocessing), grayscale ``[N, H, W]`` or RGB ``[N, H, W, 3]``.

A task may give each image a *group* (e.g. the font it was rendered from, the icon's name):
splits then keep a group on one side, so the test split measures generalisation to unseen
groups instead of near-duplicates of training images.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tvq.bench import BenchDataError
from tvq.bench.data.registry import SPLIT_ALIASES, TaskRegistry, default_cache_dir

CACHE_FORMAT = "tvq-bench-images"
SPLITS_FORMAT = "tvq-bench-image-splits"


@dataclass(frozen=True)
class ImageData:
    """A whole labelled image task: ``labels[i]`` indexes ``classes``; ``groups`` is optional."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str = ""
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


ImageLoader = Callable[[Path], ImageData]


@dataclass(frozen=True)
class ImageTaskSpec:
    """How to obtain an image task; ``load(cache_dir)`` may download packages into ``cache_dir``.

    Bump ``version`` when the conversion changes, so cached conversions are redone.
    """

    name: str
    load: ImageLoader
    source: str = "user"
    version: int = 1
    cache: bool = True


# the built-in tasks' module builds on this one, so it is imported at the first lookup
_IMAGE_TASKS: TaskRegistry[ImageTaskSpec] = TaskRegistry("image task", "register one with register_image_task", builtin="tvq.bench.vision.sources")


def register_image_task(spec: ImageTaskSpec, *, replace: bool = False) -> ImageTaskSpec:
    """Add a task so ``load_images(name)`` and ``--tasks name`` (with ``--suite vision``) find it."""
    return _IMAGE_TASKS.register(spec, replace=replace)


def get_image_task(name: str) -> ImageTaskSpec:
    return _IMAGE_TASKS.get(name)


def list_image_tasks() -> list[str]:
    return _IMAGE_TASKS.names()


def _check(data: ImageData) -> ImageData:
    """Validate shapes, dtypes and labels; return arrays in their canonical form."""
    x, y = np.asarray(data.images), np.asarray(data.labels)
    if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise BenchDataError(f"task '{data.name}': images must be uint8 [N, H, W] or [N, H, W, 3], got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or len(y) != len(x):
        raise BenchDataError(f"task '{data.name}': {len(x)} images but labels of shape {list(y.shape)}")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= len(data.classes)):
        raise BenchDataError(f"task '{data.name}': a label is outside 0..{len(data.classes) - 1}")
    if data.groups is not None and len(data.groups) != len(y):
        raise BenchDataError(f"task '{data.name}': {len(data.groups)} groups for {len(y)} images")
    groups = None if data.groups is None else [str(g) for g in data.groups]
    return ImageData(data.name, np.ascontiguousarray(x), y, [str(c) for c in data.classes], data.source, groups)


def dedupe(data: ImageData) -> ImageData:
    """Drop exact duplicate images (all copies when their labels disagree); first occurrence kept.

    Duplicates would leak test images into training; order is preserved, so splits stay deterministic.
    """
    digests = [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in data.images]
    first: dict[bytes, int] = {}
    conflict: set[bytes] = set()
    for d, y in zip(digests, data.labels.tolist(), strict=True):
        if first.setdefault(d, y) != y:
            conflict.add(d)
    seen: set[bytes] = set()
    keep = []
    for i, d in enumerate(digests):
        if d not in conflict and d not in seen:
            seen.add(d)
            keep.append(i)
    groups = None if data.groups is None else [data.groups[i] for i in keep]
    return ImageData(data.name, data.images[keep], data.labels[keep], data.classes, data.source, groups)


def _save_npz(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Compressed npz with a JSON header, written under a temporary name then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        buf = io.BytesIO()
        np.savez_compressed(buf, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)  # type: ignore[arg-type]
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_npz(path: Path, fmt: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(z["header"].tobytes())
            if header.get("format") != fmt:
                raise ValueError(f"format {header.get('format')!r}, expected {fmt!r}")
            return header, {k: z[k] for k in z.files if k != "header"}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise BenchDataError(f"{path}: unreadable ({exc}); delete it to rebuild") from None


def load_images(task: str | ImageTaskSpec, cache_dir: str | Path | None = None, *, refresh: bool = False) -> ImageData:
    """The deduplicated task, converted once and cached at ``<cache>/vision/<name>.v<version>.npz``."""
    spec = task if isinstance(task, ImageTaskSpec) else get_image_task(task)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "vision" / f"{spec.name}.v{spec.version}.npz"
    if spec.cache and path.is_file() and not refresh:
        h, a = _load_npz(path, CACHE_FORMAT)
        return ImageData(spec.name, a["images"], a["labels"], h["classes"], h["source"], h.get("groups"))
    cache.mkdir(parents=True, exist_ok=True)
    data = dedupe(_check(spec.load(cache)))
    if len(data) == 0:
        raise BenchDataError(f"image task '{spec.name}' ({spec.source}) has no examples")
    data = ImageData(spec.name, data.images, data.labels, data.classes, data.source or spec.source, data.groups)
    if spec.cache:
        header = {"format": CACHE_FORMAT, "name": spec.name, "classes": data.classes, "source": data.source,
                  "version": spec.version, "n": len(data), "groups": data.groups}  # fmt: skip
        _save_npz(path, header, {"images": data.images, "labels": data.labels})
    return data


def _rank(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()


def split_indices(
    n: int, *, seed: int, train: int, val: int, test: int, groups: Sequence[str] | None = None, val_frac: float = 0.1, test_frac: float = 0.2
) -> tuple[list[int], list[int], list[int]]:
    """Seeded order by hash (as the text suite: no RNG-version dependence), then test, val, train cuts.

    Test = min(test, 20 %), val = min(val, 10 %), train = the next ≤ ``train``. With ``groups``,
    whole groups are ordered by hash, the test and val cuts move forward and the train cut back
    to a group boundary, so no group is on two sides; a larger ``train`` still only appends.
    """
    if groups is None:
        order = sorted(range(n), key=lambda i: _rank(seed, str(i)))
        bounds = list(range(n + 1))
    else:
        order = sorted(range(n), key=lambda i: (_rank(seed, groups[i]), groups[i], i))
        bounds = [0] + [j for j in range(1, n) if groups[order[j]] != groups[order[j - 1]]] + [n]

    def up(at: int) -> int:
        return next(b for b in bounds if b >= at)

    t_end = up(min(test, int(n * test_frac)))
    v_end = up(t_end + min(val, int(n * val_frac)))
    train_end = max(b for b in bounds if b <= min(v_end + train, n))
    return order[v_end:train_end], order[t_end:v_end], order[:t_end]


@dataclass(frozen=True)
class ImageSplits:
    """Disjoint train / validation / test images of one task (uint8, native size)."""

    name: str
    classes: list[str]
    arrays: dict[str, tuple[np.ndarray, np.ndarray]]
    info: dict[str, Any] = field(default_factory=dict)

    def images(self, split: str) -> np.ndarray:
        return self.arrays[_split(split)][0]

    def labels(self, split: str) -> np.ndarray:
        return self.arrays[_split(split)][1]

    def sizes(self) -> dict[str, int]:
        return {s: len(self.arrays[s][1]) for s in ("train", "val", "test")}

    def digest(self) -> str:
        """sha256 of the classes and every image and label, to tell when cached results are stale."""
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for s in ("train", "val", "test"):
            x, y = self.arrays[s]
            h.update(f"\x00{s}\x00{list(x.shape)}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
            h.update(y.astype("<i8").tobytes())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        header = {"format": SPLITS_FORMAT, "name": self.name, "classes": self.classes, "sizes": self.sizes(), "info": self.info}
        arrays = {f"{s}_{k}": a for s, (x, y) in self.arrays.items() for k, a in (("x", x), ("y", y))}
        _save_npz(path, header, arrays)

    @classmethod
    def load(cls, path: Path) -> ImageSplits:
        h, a = _load_npz(path, SPLITS_FORMAT)
        return cls(h["name"], h["classes"], {s: (a[f"{s}_x"], a[f"{s}_y"]) for s in ("train", "val", "test")}, h.get("info", {}))


def _split(name: str) -> str:
    s = SPLIT_ALIASES.get(name, name)
    if s not in ("train", "val", "test"):
        raise BenchDataError(f"unknown split '{name}' (train, val or validation, test)")
    return s


def split_images(data: ImageData, *, seed: int = 0, train: int = 4000, val: int = 500, test: int = 1000) -> ImageSplits:
    """Seeded, grouped when the task has groups; see :func:`split_indices`."""
    tr, va, te = split_indices(len(data), seed=seed, train=train, val=val, test=test, groups=data.groups)
    arrays = {s: (data.images[idx], data.labels[idx]) for s, idx in (("train", tr), ("val", va), ("test", te))}
    info = {"seed": seed, "source": data.source, "n_total": len(data), "grouped": data.groups is not None}
    return ImageSplits(data.name, data.classes, arrays, info)
