"""What a run cost: bytes read and written, wall time, peak memory (issue 6: report, don't claim).

Every ``quantize``/``add``/``rebase``/``merge`` command ends with one line such as
``read 10.99 GB, wrote 2.14 GB in 61.2 s; peak RSS 1.9 GiB``. Bytes read are the tensor
bytes taken from the inputs (packed codes for packs), counted by the library; bytes written
are the sizes of the output files. Peak RSS is this process's (the driver's, under Ray).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int | None:
    """Resident set size now, when psutil is installed (it is optional)."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def output_bytes(*paths: str | Path | None) -> int:
    """Total size of the files at ``paths`` (a file, or every file under a folder)."""
    total = 0
    for path in paths:
        if path is None:
            continue
        p = Path(path)
        files = [p] if p.is_file() else (f for f in p.rglob("*") if f.is_file())
        total += sum(f.stat().st_size for f in files)
    return total


@dataclass
class RunStats:
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int
    rss: int | None = None

    def line(self) -> str:
        now = f" (now {_gib(self.rss)})" if self.rss is not None else ""
        return (
            f"read {_gb(self.bytes_read)}, wrote {_gb(self.bytes_written)} in {self.seconds:.1f} s; "
            f"peak RSS {_gib(self.peak_rss)}{now}"
        )


class RunMeter:
    """Started when a command starts; ``stop`` measures time and memory at its end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def stop(self, bytes_read: int, bytes_written: int) -> RunStats:
        return RunStats(bytes_read, bytes_written, time.perf_counter() - self.start, peak_rss_bytes(), current_rss_bytes())


def _gb(n: int) -> str:
    """Decimal units for I/O, as disks and mergekit's users count them."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _gib(n: int) -> str:
    """Binary units for memory, as cgroup limits and /usr/bin/time count it."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB"
