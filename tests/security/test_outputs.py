"""Outputs never lose data, and every failure to write one is one line and a non-zero exit.

Each refusal is checked for its exit code and its one line, for leaving no temporary behind,
and for changing no byte outside the output (the folder around it is hashed before and after).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tvq.cli import app
from tvq.encode.options import QuantizeOptions
from tvq.encode.pipeline import quantize
from tvq.errors import TvqError
from tvq.io import atomic
from tvq.io.atomic import atomic_dir, atomic_file

runner = CliRunner()
DEBUG_HINT = "(please report; TVQ_DEBUG=1 shows the traceback)"


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def quantize_args(tiny: dict, out: Path, *extra: object) -> list[object]:
    args: list[object] = ["quantize", "--pretrained", tiny["pre_path"], "--out", out, "--no-progress"]
    for name, p in tiny["ft_paths"].items():
        args += ["--finetuned", f"{name}={p}"]
    return [*args, *extra]


def finetuned_args(tiny: dict) -> list[str]:
    return [a for name, p in tiny["ft_paths"].items() for a in ("--finetuned", f"{name}={p}")]


def error_line(result, code: int = 2) -> str:
    """The one ``error:`` line of a failed run (whitespace normalised)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    return " ".join(lines[0].split())


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones included): sha256 of files, 'dir' for folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporaries, swapped-out folders and lock files tvq may have left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and any(t in p.name for t in (".tmp-", ".old-", ".lock")))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- refused before any work: one line, exit 2, nothing changed ---------------------------


def test_out_under_a_regular_file(tiny):
    (tiny["dir"] / "somefile").write_text("mine")
    before = tree(tiny["dir"])
    line = error_line(run(*quantize_args(tiny, tiny["dir"] / "somefile" / "pack")))
    assert "somefile is a file, not a folder" in line
    assert tree(tiny["dir"]) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_folder_output_on_an_existing_file(tiny, overwrite):
    (tiny["dir"] / "notes.txt").write_text("keep me")
    before = tree(tiny["dir"])
    extra = ["--overwrite"] if overwrite else []
    line = error_line(run(*quantize_args(tiny, tiny["dir"] / "notes.txt", *extra)))
    assert "notes.txt: exists and is not a folder" in line
    assert tree(tiny["dir"]) == before


@pytest.mark.parametrize("command", ["average", "export"])
def test_file_output_on_an_existing_folder(tiny, command):
    pack = tiny["dir"] / "pack"
    assert run(*quantize_args(tiny, pack)).exit_code == 0
    folder = tiny["dir"] / "models"
    folder.mkdir()
    (folder / "precious.bin").write_bytes(b"\x00" * 100)
    before = tree(tiny["dir"])
    if command == "average":
        result = run("average", *finetuned_args(tiny), "--out", folder, "--overwrite", "--no-progress")
    else:
        result = run("export", pack, "--task", "task0", "--out", folder, "--overwrite", "--no-progress")
    assert "models: exists and is a folder" in error_line(result)
    assert tree(tiny["dir"]) == before


@pytest.mark.parametrize("where", ["/proc/self/pack", "/sys/tvq-pack", "/dev/tvq-pack"])
def test_output_in_a_pseudo_file_system(tiny, where):
    before = tree(tiny["dir"])
    line = error_line(run(*quantize_args(tiny, Path(where))))
    assert "not a place for files" in line
    assert tree(tiny["dir"]) == before


def test_export_into_its_own_pack_is_refused(tiny):
    pack = tiny["dir"] / "pack"
    assert run(*quantize_args(tiny, pack)).exit_code == 0
    before = tree(tiny["dir"])
    line = error_line(run("export", pack, "--task", "task0", "--out", pack / "x.safetensors", "--no-progress"))
    assert "inside the input folder" in line
    assert tree(tiny["dir"]) == before


@pytest.mark.parametrize("layout", ["average_inside_out", "same_path", "out_inside_average"])
@pytest.mark.parametrize("budget", [False, True])
def test_two_outputs_that_overlap(tiny, layout, budget):
    d = tiny["dir"]
    out, avg = {
        "average_inside_out": (d / "pack", d / "pack" / "avg.safetensors"),
        "same_path": (d / "pack", d / "pack"),
        "out_inside_average": (d / "avg.safetensors" / "pack", d / "avg.safetensors"),
    }[layout]
    before = tree(d)
    extra = ["--budget-bits", "40"] if budget else ["--bits", "3"]
    line = error_line(run(*quantize_args(tiny, out, "--average-out", avg, *extra)))
    assert ("inside the other output" in line) or ("the same path as the other output" in line), line
    assert tree(d) == before


# ---- OS errors while writing: one line naming the file, exit 2, no temporary --------------


def test_disk_full(tiny, monkeypatch):
    from tvq.io.safetensors_writer import StreamingSafetensorsWriter

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(StreamingSafetensorsWriter, "add", full)
    out = tiny["dir"] / "avg.safetensors"
    before = tree(tiny["dir"])
    line = error_line(run("average", *finetuned_args(tiny), "--out", out, "--no-progress"))
    assert line == f"error: {out}: No space left on device"
    assert tree(tiny["dir"]) == before
    assert leftovers(tiny["dir"]) == []


def test_permission_denied_at_the_rename(tiny, monkeypatch):
    out = tiny["dir"] / "pack"

    def denied(tmp, path, kind, overwrite):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(atomic, "_commit", denied)
    before = tree(tiny["dir"])
    line = error_line(run(*quantize_args(tiny, out)))
    assert line == f"error: {out}: Permission denied"
    assert tree(tiny["dir"]) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_read_only_folder(tiny):
    ro = tiny["dir"] / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        before = tree(tiny["dir"])
        line = error_line(run(*quantize_args(tiny, ro / "pack")))
        assert "Permission denied" in line
        assert tree(tiny["dir"]) == before
    finally:
        ro.chmod(0o755)


def test_a_bug_is_one_line_and_exit_1(tiny, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("tvq.encode.pipeline.average_checkpoints", boom)  # the CLI imports it when the command runs
    result = run("average", *finetuned_args(tiny), "--out", tiny["dir"] / "a.safetensors")
    assert error_line(result, code=1) == f"error: internal error: RuntimeError: boom {DEBUG_HINT}"
    monkeypatch.setenv("TVQ_DEBUG", "1")
    result = run("average", *finetuned_args(tiny), "--out", tiny["dir"] / "a.safetensors")
    assert isinstance(result.exception, RuntimeError)


# ---- replacing an output ------------------------------------------------------------------


def _bits(pack: Path) -> int:
    return json.loads((pack / "manifest.json").read_text())["method"]["bits"]


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_a_pack_whole(tiny, monkeypatch, exchange):
    out = tiny["dir"] / "pack"
    assert run(*quantize_args(tiny, out, "--bits", "2")).exit_code == 0
    (out / "stray.txt").write_text("from the old pack")
    calls: list[int] = []
    real = atomic.renameat2

    def spy(src, dst, flags):
        calls.append(flags)
        return real(src, dst, flags) if exchange else False  # False: as without renameat2

    monkeypatch.setattr(atomic, "renameat2", spy)
    before = tree(tiny["dir"])
    r = run(*quantize_args(tiny, out, "--bits", "4", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert atomic.RENAME_EXCHANGE in calls
    assert _bits(out) == 4 and not (out / "stray.txt").exists()
    assert leftovers(tiny["dir"]) == []
    after = tree(tiny["dir"])
    assert {k: v for k, v in after.items() if not k.startswith("pack")} == {k: v for k, v in before.items() if not k.startswith("pack")}
    assert run("verify", out).exit_code == 0


def test_renameat2_exchanges_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic.renameat2(a, b, atomic.RENAME_EXCHANGE):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_fallback_swap_restores_the_old_folder_if_the_move_in_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    monkeypatch.setattr(atomic, "renameat2", lambda src, dst, flags: False)
    real_rename = os.rename

    def failing(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", failing)
    with pytest.raises(OSError), atomic_dir(out) as tmp:
        (tmp / "new").write_text("new")
    assert (out / "old").read_text() == "old"
    assert leftovers(tmp_path) == []


# ---- two runs, one output -----------------------------------------------------------------


def test_two_writers_of_one_output_cannot_both_succeed(tiny, monkeypatch):
    out = tiny["dir"] / "pack"
    barrier = threading.Barrier(2, timeout=120)
    real_commit = atomic._commit

    def commit_together(tmp, path, kind, overwrite):
        barrier.wait()  # both runs have passed the early check and written everything
        real_commit(tmp, path, kind, overwrite)

    monkeypatch.setattr(atomic, "_commit", commit_together)
    results: list[object] = []

    def write(bits: int) -> None:
        try:
            quantize(tiny["pre_path"], tiny["ft_paths"], out, QuantizeOptions(bits=bits), progress=False)
            results.append(bits)
        except TvqError as exc:
            results.append(exc)

    threads = [threading.Thread(target=write, args=(b,)) for b in (2, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [r for r in results if isinstance(r, int)]
    errors = [r for r in results if isinstance(r, TvqError)]
    assert len(wins) == 1 and len(errors) == 1, results
    assert "already exists" in str(errors[0])
    assert _bits(out) == wins[0]
    assert leftovers(tiny["dir"]) == []


def test_the_lock_is_exclusive_and_removed(tmp_path):
    out = tmp_path / "out"
    order: list[str] = []

    def second() -> None:
        with atomic.output_lock(out):
            order.append("second")

    with atomic.output_lock(out):
        assert (tmp_path / ".out.lock").exists()
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first")
    t.join(timeout=10)
    assert order == ["first", "second"]
    assert list(tmp_path.iterdir()) == []


def test_overwrite_false_refuses_an_output_created_meanwhile(tmp_path):
    out = tmp_path / "out.bin"
    before = None
    with pytest.raises(TvqError, match="already exists"), atomic_file(out, overwrite=False) as tmp:
        tmp.write_bytes(b"mine")
        out.write_bytes(b"theirs")  # another run finished first
        before = tree(tmp_path)
    assert out.read_bytes() == b"theirs"
    assert tree(tmp_path) == {k: v for k, v in before.items() if ".tmp-" not in k}
    assert leftovers(tmp_path) == []


# ---- temporaries left by kill -9 ----------------------------------------------------------


def test_stale_temporaries_of_dead_runs_are_removed(tiny, caplog):
    d = tiny["dir"]
    dead = dead_pid()
    stale_dir = d / f".pack.tmp-{dead}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "task.safetensors").write_bytes(b"half")
    old_style = d / ".pack.tmp-89abcdef"
    old_style.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = d / f".pack.tmp-{alive.pid}-fedcba98"
        live.mkdir()
        other = d / f".other.tmp-{dead}-0123abcd"
        other.write_bytes(b"not ours to judge")
        caplog.set_level(logging.WARNING, logger="tvq.io.atomic")
        r = run(*quantize_args(tiny, d / "pack"))
        assert r.exit_code == 0, r.output
    finally:
        alive.kill()
        alive.wait()
    assert not stale_dir.exists()
    assert old_style.exists() and live.exists() and other.exists()
    messages = [rec.getMessage() for rec in caplog.records]
    assert sum(f"removed {stale_dir}" in m and f"process {dead}" in m for m in messages) == 1, messages
    assert sum(str(old_style) in m and "no process id" in m for m in messages) == 1, messages
    assert not any(str(live) in m or str(other) in m for m in messages), messages


def test_stale_old_folder_is_kept_while_the_output_is_missing(tmp_path, caplog):
    out = tmp_path / "out"
    aside = tmp_path / f".out.old-{dead_pid()}-0123abcd"
    aside.mkdir()
    caplog.set_level(logging.WARNING, logger="tvq.io.atomic")
    atomic.sweep_stale(out)
    assert aside.exists()
    assert any("rename it back" in r.getMessage() for r in caplog.records)
    out.mkdir()
    atomic.sweep_stale(out)
    assert not aside.exists()


def test_temporaries_carry_the_pid(tmp_path):
    with atomic_file(tmp_path / "f.bin") as tmp:
        assert tmp.name.startswith(f".f.bin.tmp-{os.getpid()}-")
        tmp.write_bytes(b"x")
    assert (tmp_path / "f.bin").read_bytes() == b"x"
    assert leftovers(tmp_path) == []


# ---- SIGTERM mid-run: a real process ------------------------------------------------------

# The real entry point, slowed down (each tensor written waits) so the signal lands mid-run.
SLOW_TVQ = """
import sys, time
from tvq.io import safetensors_writer as w
add = w.StreamingSafetensorsWriter.add
def slow(self, *args, **kwargs):
    time.sleep(0.2)
    return add(self, *args, **kwargs)
w.StreamingSafetensorsWriter.add = slow
from tvq.cli import main
sys.argv[0] = "tvq"
sys.exit(main())
"""


def test_sigterm_mid_run_leaves_nothing(tiny):
    d = tiny["dir"]
    out, avg = d / "pack", d / "avg.safetensors"
    before = tree(d)
    args = [str(a) for a in quantize_args(tiny, out, "--average-out", avg, "--threads", "1")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TVQ, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".pack.tmp-") for p in d.iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no temporary appeared"
            time.sleep(0.05)
        time.sleep(0.3)  # well inside the writing
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (stdout, stderr)
    assert [line for line in stderr.splitlines() if line.strip()] == ["terminated: no output was written"], stderr
    assert not out.exists() and not avg.exists()
    assert leftovers(d) == []
    assert tree(d) == before
