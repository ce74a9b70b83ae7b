"""Atomic outputs: write under a temporary name, then rename; never clobber silently.

An output is built as a hidden sibling ``.{name}.tmp-{pid}-{random}`` and renamed into place
only once complete, so a reader sees the old output or the new one, never half of one. The
temporary is removed on every exit path Python sees (errors, Ctrl-C, SIGTERM via
:mod:`tvq.io.signals`); one left by ``kill -9`` carries the pid of a process that no longer
exists, and the next write to the same output removes it. The final existence check and the
rename run under an exclusive lock on ``.{name}.lock``, so two runs writing the same output
cannot both succeed without ``--overwrite``. An existing folder is replaced by one atomic
exchange (Linux ``renameat2(RENAME_EXCHANGE)``): the final name is never empty.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Literal

from tvq.errors import TvqError, where

log = logging.getLogger(__name__)

Kind = Literal["file", "dir"]
# Pseudo file systems: writing a sibling temporary there and renaming it over an entry is
# at best an error and at worst (as root, in /dev) replaces a device node.
SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
SHARED_MEMORY = Path("/dev/shm")  # a tmpfs: a fine place for files
# Errors about the output's storage: when they carry no file name, they are the output's.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def check_output(path: Path, overwrite: bool, inputs: Sequence[Path] = (), *, kind: Kind | None = None) -> None:
    """Refuse, before any work is done, an output that cannot or must not be written: one over
    or inside an input, one under a file or in /proc, /sys or /dev, one of the wrong ``kind``
    (a folder where a file is written, or the reverse, even with ``overwrite``: replacing it
    would delete what was there), and an existing one unless ``overwrite``."""
    path = Path(path)
    resolved = path.resolve()
    for inp in inputs:
        inp_r = Path(inp).resolve()
        if resolved == inp_r or inp_r.is_relative_to(resolved):
            raise TvqError(f"{where(path)}: output would overwrite the input {inp}")
        if inp_r.is_dir() and resolved.is_relative_to(inp_r):
            raise TvqError(f"{where(path)}: output would be written inside the input folder {inp}")
    for root in SYSTEM_ROOTS:
        if resolved.is_relative_to(root) and not resolved.is_relative_to(SHARED_MEMORY):
            raise TvqError(f"{where(path)}: output would be written in {root}, which is not a place for files")
    for parent in path.absolute().parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                what = "a file, not a folder" if parent.is_file() else "not a folder"
                raise TvqError(f"{where(path)}: {parent} is {what}")
            break
    if not os.path.lexists(path):
        return
    problem = _kind_problem(path, kind)
    if problem is not None:
        raise TvqError(f"{where(path)}: {problem}")
    if not overwrite:
        raise TvqError(f"{where(path)}: output already exists (pass --overwrite to replace it)")


def check_distinct_outputs(*paths: Path | None) -> None:
    """Refuse two outputs of one run that are the same path or nested: writing the second
    would replace or delete the first while tvq reports both written."""
    given = [Path(p) for p in paths if p is not None]
    for i, a in enumerate(given):
        for b in given[i + 1 :]:
            ra, rb = a.resolve(), b.resolve()
            if ra == rb:
                raise TvqError(f"{where(b)}: the same path as the other output {a}")
            if rb.is_relative_to(ra) or ra.is_relative_to(rb):
                inner, outer = (b, a) if rb.is_relative_to(ra) else (a, b)
                raise TvqError(f"{where(inner)}: output would be written inside the other output {outer}")


def _kind_problem(path: Path, kind: Kind | None) -> str | None:
    """Why the existing entry at ``path`` cannot be replaced by a ``kind`` (None if it can)."""
    mode = os.lstat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        return "exists and is not a regular file or folder"
    if kind == "dir" and not stat.S_ISDIR(mode):
        return "exists and is not a folder (a folder is written here); remove it or choose another path"
    if kind == "file" and stat.S_ISDIR(mode):
        return "exists and is a folder (a file is written here); remove it or choose another path"
    return None


def _temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """``.{name}.{tag}-{pid}-{random}``: the pid lets a later run tell a dead run's leftover."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_stale(path: Path) -> None:
    """Remove the temporaries of ``path`` left by runs that were killed (their pid is gone).

    A ``.old-`` sibling holds the previous output moved aside by the fallback swap: it is
    removed only once ``path`` exists again, otherwise reported so it can be renamed back.
    Old-style temporaries (no pid) are reported, not deleted: tvq cannot tell if their run
    still lives. Pids are those of this machine (and pid namespace)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{{8}}")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None:
            continue
        stale = path.parent / entry.name
        tag, pid = m.group(1), m.group(2)
        if pid is None:
            log.warning("%s: left by an earlier tvq run (no process id in its name); remove it once no run writes %s", stale, path)
        elif int(pid) == os.getpid() or _alive(int(pid)):
            continue
        elif tag == "old" and not os.path.lexists(path):
            log.warning("%s: the previous %s, moved aside by an interrupted replace; rename it back to keep it", stale, path)
        else:
            _remove(stale)
            log.warning("removed %s, left by an interrupted tvq run (process %s)", stale, pid)


@contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.{name}.lock`` beside ``path``; the file is removed after.

    A waiter may lock a lock file its holder has just unlinked, so the lock counts only once
    the locked file is still the one at that name (same inode); otherwise it is taken again."""
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(lock)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)  # releases the lock, after the unlink (see above)


@functools.cache
def _libc_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``: True once done, False where the kernel, libc or file system lacks
    it (the caller falls back); any other failure raises OSError."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _swap_dirs(tmp: Path, path: Path) -> None:
    """Put the folder ``tmp`` at ``path`` (an existing folder), then delete the old one.

    renameat2(RENAME_EXCHANGE) swaps both names in one step. The fallback (no renameat2) moves
    the old folder aside, then the new one in: between the two renames ``path`` does not
    exist; if the run is killed there, the old folder survives as ``.{name}.old-{pid}-*``."""
    if renameat2(tmp, path, RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = _temp_sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every file system allows it)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(tmp: Path, path: Path, kind: Kind, overwrite: bool) -> None:
    """Rename ``tmp`` to ``path`` under the output lock, checking again that ``path`` is free
    (another run may have finished first) or replaceable."""
    with output_lock(path):
        if os.path.lexists(path):
            if not overwrite:
                raise TvqError(f"{where(path)}: output already exists (another run wrote it first; pass --overwrite to replace it)")
            problem = _kind_problem(path, kind)
            if problem is not None:
                raise TvqError(f"{where(path)}: {problem}")
            if kind == "dir":
                _swap_dirs(tmp, path)
            else:
                os.replace(tmp, path)
        elif not renameat2(tmp, path, RENAME_NOREPLACE):
            os.rename(tmp, path)  # the lock (for tvq runs) and the check above guard this
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _name_storage_error(exc: OSError, path: Path) -> None:
    """A write error without a file name (a full disk on ``write()``) names the output."""
    if exc.filename is None and exc.errno in _WRITE_ERRNOS:
        exc.filename = str(path)


@contextmanager
def atomic_dir(path: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    ``overwrite=False`` refuses, at the rename, a ``path`` another run created meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _commit(tmp, path, "dir", overwrite)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            _name_storage_error(exc, path)
        raise


@contextmanager
def atomic_file(path: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path that becomes ``path`` only if the block succeeds.

    ``overwrite=False`` refuses, at the rename, a ``path`` another run created meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _commit(tmp, path, "file", overwrite)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            _name_storage_error(exc, path)
        raise
