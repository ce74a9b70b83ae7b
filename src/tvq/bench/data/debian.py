"""Data shipped in Debian packages: ``apt-get download`` + extract, and R lazy-load databases.

We never ``apt-get install`` anything (the ``r-cran-*`` packages would pull in all of R): the
``.deb`` is downloaded into the cache and unpacked there. A ``.deb`` put into ``<cache>/debs/``
by hand is used as is, so machines without apt work too.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import subprocess
import tarfile
import uuid
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tvq.bench import BenchDataError


def _how(pkg: str, debs: Path) -> str:
    return (
        f"run `apt-get update` and retry, or download {pkg}_*.deb from "
        f"https://packages.debian.org/bookworm/{pkg} into {debs}/"
    )


def _find_deb(pkg: str, debs: Path) -> Path | None:
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    return found[-1] if found else None


def download_deb(pkg: str, cache_dir: Path) -> Path:
    """The package's ``.deb`` in ``<cache>/debs/``, downloaded with ``apt-get download`` if absent."""
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if (deb := _find_deb(pkg, debs)) is not None:
        return deb
    if shutil.which("apt-get") is None:
        raise BenchDataError(f"Debian package '{pkg}' is needed but apt-get is not available: {_how(pkg, debs)}")
    try:
        res = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchDataError(f"Debian package '{pkg}': apt-get download failed ({exc}); {_how(pkg, debs)}") from None
    deb = _find_deb(pkg, debs)
    if res.returncode != 0 or deb is None:
        err = next((ln for ln in res.stderr.splitlines() if ln.startswith("E:")), res.stderr.strip()[-200:])
        raise BenchDataError(f"Debian package '{pkg}': apt-get download failed ({err}); {_how(pkg, debs)}")
    return deb


def _extract_python(deb: Path, dest: Path) -> None:
    """Unpack a .deb without dpkg: an ``ar`` archive whose ``data.tar.*`` holds the files."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise BenchDataError(f"{deb}: not a Debian package (bad ar header); delete it and retry")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            openers = {".xz": lzma.decompress, ".gz": gzip.decompress, ".bz2": bz2.decompress, ".tar": lambda b: b}
            raw = next((f(body) for ext, f in openers.items() if name.endswith(ext)), None)
            if raw is None:
                raise BenchDataError(f"{deb}: {name} needs dpkg-deb to unpack (apt-get install dpkg)")
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(dest, filter="data")
                else:  # Python without PEP 706; a .deb from the Debian archive is trusted
                    tar.extractall(dest)
            return
        pos += 60 + size + (size & 1)
    raise BenchDataError(f"{deb}: no data.tar member; delete it and retry")


def fetch_deb(pkg: str, cache_dir: Path) -> Path:
    """Root of the unpacked package ``<cache>/debs/<pkg>/`` (download and unpack once)."""
    root = cache_dir / "debs" / pkg
    if root.is_dir():
        return root
    deb = download_deb(pkg, cache_dir)
    tmp = root.with_name(f".{pkg}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        if shutil.which("dpkg-deb"):
            res = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
            if res.returncode != 0:
                raise BenchDataError(f"{deb}: dpkg-deb -x failed ({res.stderr.strip()[-200:]}); delete it and retry")
        else:
            _extract_python(deb, tmp)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def package_file(pkg: str, rel: str, cache_dir: Path) -> Path:
    """A file inside an unpacked package, e.g. ``usr/share/wordnet/data.noun``."""
    path = fetch_deb(pkg, cache_dir) / rel
    if not path.exists():
        raise BenchDataError(f"Debian package '{pkg}' has no {rel}; delete {cache_dir / 'debs'} and retry")
    return path


def _rdata() -> Any:
    try:
        import rdata
    except ImportError:
        raise BenchDataError("reading R data needs the PyPI package 'rdata': pip install rdata") from None
    return rdata


def _parse_r(raw: bytes) -> Any:
    rdata = _rdata()
    with warnings.catch_warnings():  # a bare serialization has no RDS magic; rdata warns and copes
        warnings.simplefilter("ignore")
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))


def read_r_lazyload(data_dir: Path, name: str) -> Any:
    """One object of an R package's lazy-load database (``data/Rdata.rdx`` + ``Rdata.rdb``).

    The ``.rdx`` index is a gzip'ed serialization whose ``variables`` maps a name to
    ``(offset, length)`` in the ``.rdb``; each blob there is a 4-byte length, then (for
    compression types 2/3) a type byte, then the compressed serialization.
    """
    index = _parse_r(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    variables = index["variables"]
    if name not in variables:
        raise BenchDataError(f"{data_dir}: R data has no object '{name}' (has {', '.join(map(str, variables))})")
    offset, length = (int(x) for x in variables[name])
    with open(data_dir / "Rdata.rdb", "rb") as f:
        f.seek(offset)
        blob = f.read(length)
    kind = blob[4:5]
    codecs: dict[bytes, Callable[[bytes], bytes]] = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
    raw = codecs[kind](blob[5:]) if kind in codecs else zlib.decompress(blob[4:])
    return _parse_r(raw)


def r_package_object(pkg: str, name: str, cache_dir: Path) -> Any:
    """A data object of a Debian ``r-cran-*`` package, e.g. ``("r-cran-tidytext", "sentiments")``."""
    r_name = pkg.removeprefix("r-cran-")
    return read_r_lazyload(package_file(pkg, f"usr/lib/R/site-library/{r_name}/data", cache_dir), name)
