"""LLM-scale benchmark: tvq quantize / tvq merge against mergekit on a ~1.1B Llama family.

One run (see docs/llm-benchmark.md):

1. generate the synthetic models if missing (``make_models.py``; ``--skip-generate`` to not);
2. time (wall) and measure peak memory of each step, in a fresh process each:
   mergekit ``task_arithmetic`` and ``ties`` on the full bf16 checkpoints; ``tvq quantize``
   TVQ 4-bit, TVQ 2-bit and RTVQ B3O2 (error-corrected); ``tvq merge`` task arithmetic and
   TIES from each pack (and, as an engine-only reference, from the bf16 checkpoints);
3. repeat the tvq steps inside a cgroup-v1 memory group capped at ``--cap`` (3 GiB) and
   check the outputs are byte-identical (sha256 per file) to the uncapped run;
4. print a table (wall s, peak RSS MiB, bytes on disk, ratios to mergekit, targets) and
   write ``results.json`` and ``results.md`` under the workdir.

Peak memory is measured three ways: ``/usr/bin/time -v`` "Maximum resident set size"
(largest process; counts file pages mapped from the page cache, e.g. mmap'd safetensors),
the peak of the process tree's anonymous RSS (RssAnon, polled every 0.1 s: the heap, what
really has to fit) and, in the capped run, the cgroup's ``memory.max_usage_in_bytes``
(anon + page cache charged to the group).

Semantics are matched: tvq TA is θ_pre + λ·Σ_t τ_t with λ = 0.3, i.e. mergekit
``task_arithmetic`` with weight 0.3 per model and ``normalize: false``. tvq TIES (λ = 0.3,
density 0.2, disjoint *mean*, ``--scope tensor`` = per-tensor top-k like mergekit) is mergekit
``ties`` with weight 1, density 0.2, ``normalize: true`` (the disjoint mean) and ``lambda: 0.3``.
mergekit computes in fp32 (``dtype: float32``) and writes bf16 (``out_dtype``), like tvq.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LAMBDA = 0.3
DENSITY = 0.2
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
CGROUP_NAME = "tvq-bench"

PACKS: dict[str, list[str]] = {
    "tvq4": ["--bits", "4"],
    "tvq2": ["--bits", "2"],
    "rtvq_b3o2": ["--residual", "--base-bits", "3", "--bits", "2", "--error-correction"],
    # issue 15: a budget between TVQ 2-bit's and 3-bit's coded sizes (anchored: TVQ 2-bit + upgrades)
    "budget1": ["--budget-bits", "1.0"],
    # the same for an RTVQ request (B3O2 + EC's flags): its analysis prices RTVQ pairs and TVQ anchors
    "budget_rtvq": ["--residual", "--base-bits", "3", "--bits", "2", "--error-correction", "--budget-bits", "2.375"],
}
PACK_LABELS = {"tvq4": "TVQ 4-bit", "tvq2": "TVQ 2-bit", "rtvq_b3o2": "RTVQ B3O2+EC", "budget1": "budget 1.0 b/param",
               "budget_rtvq": "RTVQ budget 2.375 b/param"}
DEFAULT_PACKS = ["tvq4", "tvq2", "rtvq_b3o2"]


# ----------------------------------------------------------------------------- steps


@dataclass
class Step:
    name: str
    kind: str  # mergekit | quantize | merge
    label: str
    output: Path
    cmd: list[str]
    inputs: list[Path]
    reference: str | None = None  # mergekit step this one is compared with
    method: str | None = None  # task_arithmetic | ties (merges)
    pack: str | None = None
    cappable: bool = False


@dataclass
class Measurement:
    step: str
    label: str
    kind: str
    capped: bool
    rc: int
    wall_s: float
    user_s: float | None = None
    sys_s: float | None = None
    maxrss_mib: float | None = None  # /usr/bin/time -v: largest process, anon + mapped file pages
    peak_anon_mib: float | None = None  # polled: process tree RssAnon
    peak_tree_rss_mib: float | None = None  # polled: process tree RSS
    cgroup_peak_mib: float | None = None
    cgroup_failcnt: int | None = None
    cgroup_oom_kills: int | None = None
    bytes_on_disk: int | None = None
    other_cpu_cores: float | None = None  # average cores used by other processes meanwhile
    loadavg_1m: tuple[float, float] | None = None  # at start, at end
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    pack_info: dict[str, Any] | None = None
    stderr_tail: str = ""


def mergekit_config(method: str, models: Path, tasks: list[str]) -> str:
    """YAML equivalent of tvq's TA / TIES (see the module docstring)."""
    lines = [f"merge_method: {method}", f"base_model: {models / 'base'}", "models:"]
    for t in tasks:
        lines.append(f"  - model: {models / t}")
        if method == "task_arithmetic":
            lines.append(f"    parameters: {{weight: {LAMBDA}}}")
        else:
            lines.append(f"    parameters: {{weight: 1.0, density: {DENSITY}}}")
    lines.append("parameters:")
    if method == "task_arithmetic":
        lines.append("  normalize: false")
    else:
        lines += ["  normalize: true", f"  lambda: {LAMBDA}"]
    lines += ["dtype: float32", "out_dtype: bfloat16", ""]
    return "\n".join(lines)


def tvq_method_args(method: str, ties_scope: str) -> list[str]:
    if method == "task_arithmetic":
        return ["--method", "task_arithmetic", "--lambda", str(LAMBDA)]
    return ["--method", "ties", "--density", str(DENSITY), "--lambda", str(LAMBDA), "--scope", ties_scope]


def build_steps(args: argparse.Namespace, tasks: list[str], have_merge: bool, root: Path) -> list[Step]:
    """All steps, outputs under ``root`` (the workdir, or its ``capped/`` twin).

    Merges always read the uncapped run's packs: a capped merge then measures the merge
    alone (byte-identical packs are checked by the capped quantize), and a failed capped
    quantize cannot make the capped merge fail with "pack not found" (run 1's rc=2)."""
    packs_root = args.workdir / "packs"
    models = args.workdir / "models"
    model_dirs = [models / "base", *(models / t for t in tasks)]
    cfg_dir = args.workdir / "configs"
    tvq = [shutil.which("tvq") or "tvq"]
    mk = [shutil.which("mergekit-yaml") or "mergekit-yaml"]
    steps: list[Step] = []
    for method, short in (("task_arithmetic", "ta"), ("ties", "ties")):
        out = root / "out" / f"mergekit_{short}"
        steps.append(
            Step(
                f"mergekit_{short}", "mergekit", f"mergekit {method}", out,
                [*mk, str(cfg_dir / f"mergekit_{short}.yml"), str(out), "--no-copy-tokenizer", "--lazy-unpickle",
                 "--out-shard-size", args.mergekit_shard, "--no-write-model-card", "--quiet", *args.mergekit_arg],
                model_dirs, method=method,
            )
        )  # fmt: skip
    ft_args = [a for t in tasks for a in ("-f", f"{t}={models / t}")]
    threads = ["--threads", str(args.tvq_threads)] if args.tvq_threads else []
    for pack in args.packs:
        out = root / "packs" / pack
        steps.append(
            Step(
                f"quantize_{pack}", "quantize", f"tvq quantize {PACK_LABELS[pack]}", out,
                [*tvq, "quantize", "-p", str(models / "base"), *ft_args, *PACKS[pack], "-o", str(out),
                 "--overwrite", "--no-progress",
                 *threads, *args.tvq_quantize_arg],
                model_dirs, reference="mergekit_ta", pack=pack, cappable=True,
            )
        )  # fmt: skip
    if have_merge:
        for pack in args.packs:
            for method, short in (("task_arithmetic", "ta"), ("ties", "ties")):
                out = root / "out" / f"merge_{short}_{pack}"
                steps.append(
                    Step(
                        f"merge_{short}_{pack}", "merge", f"tvq merge {short.upper()} ← {PACK_LABELS[pack]}", out,
                        [*tvq, "merge", "--pack", str(packs_root / pack), "-p", str(models / "base"), "-o", str(out),
                         "--max-shard-size", args.tvq_shard, "--overwrite", "--no-progress", *threads,
                         *tvq_method_args(method, args.ties_scope)],
                        [packs_root / pack, models / "base"], reference=f"mergekit_{short}", method=method, pack=pack,
                        cappable=True,
                    )
                )  # fmt: skip
        if args.ckpt_merge:
            for method, short in (("task_arithmetic", "ta"), ("ties", "ties")):
                out = root / "out" / f"merge_{short}_ckpt"
                steps.append(
                    Step(
                        f"merge_{short}_ckpt", "merge", f"tvq merge {short.upper()} ← bf16 checkpoints", out,
                        [*tvq, "merge", "-p", str(models / "base"), *ft_args, "-o", str(out),
                         "--max-shard-size", args.tvq_shard, "--overwrite", "--no-progress",
                         *tvq_method_args(method, args.ties_scope)],
                        model_dirs, reference=f"mergekit_{short}", method=method,
                    )
                )  # fmt: skip
    return steps


# ----------------------------------------------------------------------------- measuring


def _proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat ppid links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in KiB of one process (0 when it is gone)."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except OSError:
        pass
    return rss, anon


class TreePoller(threading.Thread):
    """Peak RSS and anonymous RSS summed over a process tree, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_anon = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss = anon = 0
            for p in _proc_tree(self.pid):
                r, a = _status_kib(p)
                rss += r
                anon += a
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def parse_time_v(text: str) -> dict[str, float]:
    """The fields we use from GNU time's ``-v`` report."""
    out: dict[str, float] = {}
    pats = {
        "maxrss_kib": r"Maximum resident set size \(kbytes\): (\d+)",
        "user_s": r"User time \(seconds\): ([\d.]+)",
        "sys_s": r"System time \(seconds\): ([\d.]+)",
    }
    for key, pat in pats.items():
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1))
    return out


class Cgroup:
    """A cgroup-v1 memory group with a hard limit; children join it by writing their pid."""

    def __init__(self, limit_bytes: int, name: str = CGROUP_NAME) -> None:
        self.path = CGROUP_ROOT / name
        if not CGROUP_ROOT.is_dir():
            raise SystemExit(f"{CGROUP_ROOT}: no cgroup-v1 memory controller mounted")
        self.path.mkdir(exist_ok=True)
        self.limit = limit_bytes
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        got = int((self.path / "memory.limit_in_bytes").read_text())
        if got > limit_bytes:
            raise SystemExit(f"{self.path}: limit not applied (reads {got})")

    def reset(self) -> None:
        for name in ("memory.max_usage_in_bytes", "memory.failcnt"):
            with contextlib.suppress(OSError):
                (self.path / name).write_text("0")

    def read(self) -> tuple[int, int, int]:
        peak = int((self.path / "memory.max_usage_in_bytes").read_text())
        failcnt = int((self.path / "memory.failcnt").read_text())
        oom = 0
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                oom = int(line.split()[1])
        return peak, failcnt, oom

    def wrap(self, cmd: list[str]) -> list[str]:
        """``sh`` puts itself in the group, then execs the command (so it starts inside)."""
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *cmd]

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, from /proc/stat), minus this
    process's own (the poller), so that what is left besides the child is other load."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK") - ru.ru_utime - ru.ru_stime


def warm_cache(paths: list[Path]) -> None:
    """Read the inputs once so every step starts from the same (warm) page cache."""
    buf = bytearray(1 << 24)
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def output_files(path: Path) -> dict[str, str]:
    """sha256 of every file under an output (a folder or one file)."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
        out[str(f.relative_to(path)) if f != path else f.name] = h.hexdigest()
    return out


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pack_info(path: Path) -> dict[str, Any] | None:
    proc = subprocess.run([shutil.which("tvq") or "tvq", "info", str(path), "--json"], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-500:]}
    info = json.loads(proc.stdout)
    keep = ("total_bytes", "theoretical_bytes", "overhead_bytes", "bits_per_param", "ratio", "base_bytes", "n_params")
    out = {k: info.get(k) for k in keep}
    out["rel_error"] = {t["name"]: t.get("rel_error") for t in info.get("tasks", [])}
    if out["total_bytes"] and out["theoretical_bytes"]:
        out["overhead_frac"] = out["total_bytes"] / out["theoretical_bytes"] - 1
    return out


def run_step(step: Step, *, cgroup: Cgroup | None, cache: str, log_dir: Path, hash_outputs: bool, env: dict[str, str]) -> Measurement:
    if step.output.exists():
        shutil.rmtree(step.output) if step.output.is_dir() else step.output.unlink()
    step.output.parent.mkdir(parents=True, exist_ok=True)
    if cache == "cold":
        drop_caches()
    else:
        warm_cache(step.inputs)
    tag = f"{step.name}{'.capped' if cgroup else ''}"
    time_file = log_dir / f"{tag}.time"
    cmd = ["/usr/bin/time", "-v", "-o", str(time_file), *step.cmd]
    if cgroup is not None:
        cgroup.reset()
        cmd = cgroup.wrap(cmd)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    print(f"  $ {shlex.join(step.cmd)}" + ("   [capped]" if cgroup else ""), flush=True)
    load0 = os.getloadavg()[0]
    with open(log_dir / f"{tag}.log", "wb") as log:
        busy0 = cpu_busy_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        poller = TreePoller(proc.pid)
        poller.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        busy = cpu_busy_s() - busy0
        poller.stop()
    subprocess.run(["sync"], check=False)  # flush this step's writes before the next one (untimed)
    tv = parse_time_v(time_file.read_text()) if time_file.exists() else {}
    m = Measurement(
        step.name, step.label, step.kind, cgroup is not None, rc, wall,
        user_s=tv.get("user_s"), sys_s=tv.get("sys_s"),
        maxrss_mib=tv["maxrss_kib"] / 1024 if "maxrss_kib" in tv else None,
        peak_anon_mib=poller.peak_anon / 1024, peak_tree_rss_mib=poller.peak_rss / 1024,
    )  # fmt: skip
    if m.user_s is not None:
        m.other_cpu_cores = max(0.0, busy - m.user_s - (m.sys_s or 0)) / wall
    m.loadavg_1m = (load0, os.getloadavg()[0])
    if cgroup is not None:
        peak, failcnt, oom = cgroup.read()
        m.cgroup_peak_mib, m.cgroup_failcnt, m.cgroup_oom_kills = peak / 2**20, failcnt, oom
    if rc != 0:
        m.stderr_tail = (log_dir / f"{tag}.log").read_text(errors="replace")[-3000:]
        print(f"    FAILED rc={rc}:\n{m.stderr_tail}", flush=True)
        return m
    m.bytes_on_disk = disk_bytes(step.output)
    if hash_outputs:
        m.files = output_files(step.output)
    if step.kind == "quantize":
        m.pack_info = pack_info(step.output)
    print(
        f"    wall {wall:.1f} s, CPU {(m.user_s or 0) + (m.sys_s or 0):.0f} s, others {m.other_cpu_cores or 0:.2f} cores, "
        f"maxrss {m.maxrss_mib or 0:.0f} MiB, anon {m.peak_anon_mib:.0f} MiB"
        + (f", cgroup peak {m.cgroup_peak_mib:.0f} MiB" if cgroup else "")
        + f", {m.bytes_on_disk / 1e9:.3f} GB on disk",
        flush=True,
    )
    return m


# ----------------------------------------------------------------------------- fidelity


def merged_delta_error(merged: Path, reference: Path, base: Path) -> dict[str, float]:
    """‖(θ_m − θ_pre) − (θ_ref − θ_pre)‖ / ‖θ_ref − θ_pre‖ over the whole model (streamed), and exact-equal fraction."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        single = folder / "model.safetensors"
        with safe_open(str(single), "pt") as fh:
            return dict.fromkeys(fh.keys(), single)

    im, ir, ib = index(merged), index(reference), index(base)
    num = den = 0.0
    equal = total = 0
    handles: dict[Path, Any] = {}

    def get(file: Path, key: str) -> torch.Tensor:
        if file not in handles:
            handles[file] = safe_open(str(file), "pt")
        return handles[file].get_tensor(key)

    for key in ib:
        pre = get(ib[key], key).float()
        a = get(im[key], key)
        b = get(ir[key], key)
        equal += int((a == b).sum())
        total += a.numel()
        da, db = a.float() - pre, b.float() - pre
        num += float((da - db).double().pow(2).sum())
        den += float(db.double().pow(2).sum())
    return {"rel_delta_error": (num / den) ** 0.5 if den else 0.0, "equal_frac": equal / total if total else 1.0}


# ----------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def rows(results: list[Measurement], steps: dict[str, Step], fidelity: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Table rows with ratios to the matching mergekit run and target checks."""
    by = {m.step: m for m in results if not m.capped}
    capped = {m.step: m for m in results if m.capped}
    out = []
    for m in results:
        if m.capped:
            continue
        st = steps[m.step]
        ref = by.get(st.reference) if st.reference else None
        ok_ref = ref is not None and ref.rc == 0 and m.rc == 0
        wall_ratio = m.wall_s / ref.wall_s if ok_ref else None
        rss_ratio = m.maxrss_mib / ref.maxrss_mib if ok_ref and m.maxrss_mib and ref.maxrss_mib else None
        anon_ratio = m.peak_anon_mib / ref.peak_anon_mib if ok_ref and m.peak_anon_mib and ref.peak_anon_mib else None
        targets: list[str] = []
        if ok_ref and m.kind == "quantize":
            targets.append(f"wall≤0.5×:{'✓' if wall_ratio <= 0.5 else '✗'}")
        if ok_ref and m.kind == "merge" and st.pack:
            limit = 0.5 if st.method == "task_arithmetic" else 0.2
            targets.append(f"wall≤{limit}×:{'✓' if wall_ratio <= limit else '✗'}")
        if ok_ref and st.cappable and rss_ratio is not None:
            targets.append(f"RSS≤0.5×:{'✓' if rss_ratio <= 0.5 else '✗'}")
        if m.pack_info and m.pack_info.get("overhead_frac") is not None:
            targets.append(f"size≤1%:{'✓' if m.pack_info['overhead_frac'] <= 0.01 else '✗'}")
        c = capped.get(m.step)
        if c is not None:
            same = c.rc == 0 and m.rc == 0 and c.files == m.files and bool(m.files)
            if same:
                verdict = "✓ identical"
            elif c.rc == 137:
                verdict = "✗ OOM-killed"
            elif c.rc:
                verdict = f"✗ rc={c.rc}"
            else:
                verdict = "✗ differs"
            targets.append(f"cap:{verdict}")
        fid = fidelity.get(m.step)
        out.append(
            {
                "step": m.step,
                "label": m.label,
                "rc": m.rc,
                "wall_s": m.wall_s,
                "cpu_s": (m.user_s or 0) + (m.sys_s or 0) if m.user_s is not None else None,
                "other_cpu_cores": m.other_cpu_cores,
                "maxrss_mib": m.maxrss_mib,
                "peak_anon_mib": m.peak_anon_mib,
                "bytes_on_disk": m.bytes_on_disk,
                "wall_ratio": wall_ratio,
                "rss_ratio": rss_ratio,
                "anon_ratio": anon_ratio,
                "reference": st.reference,
                "capped_wall_s": c.wall_s if c else None,
                "capped_cgroup_peak_mib": c.cgroup_peak_mib if c else None,
                "capped_maxrss_mib": c.maxrss_mib if c else None,
                "capped_peak_anon_mib": c.peak_anon_mib if c and c.rc == 0 else None,
                "pack_overhead_pct": 100 * m.pack_info["overhead_frac"] if m.pack_info and m.pack_info.get("overhead_frac") is not None else None,
                "rel_delta_error_vs_mergekit": fid["rel_delta_error"] if fid else None,
                "targets": " ".join(targets),
            }
        )
    return out


COLUMNS = [
    ("step", "step", None),
    ("wall s", "wall_s", ".1f"),
    ("CPU s", "cpu_s", ".0f"),
    ("others' cores", "other_cpu_cores", ".2f"),
    ("max RSS MiB", "maxrss_mib", ".0f"),
    ("peak anon MiB", "peak_anon_mib", ".0f"),
    ("on disk GB", "bytes_on_disk", None),
    ("wall ×mk", "wall_ratio", ".2f"),
    ("RSS ×mk", "rss_ratio", ".2f"),
    ("anon ×mk", "anon_ratio", ".2f"),
    ("pack over theor. %", "pack_overhead_pct", ".2f"),
    ("Δ err vs mk", "rel_delta_error_vs_mergekit", ".3f"),
    ("capped wall s", "capped_wall_s", ".1f"),
    ("capped anon MiB", "capped_peak_anon_mib", ".0f"),
    ("targets", "targets", None),
]


def cell(row: dict[str, Any], key: str, spec: str | None) -> str:
    v = row.get(key)
    if key == "bytes_on_disk":
        return _fmt(v / 1e9 if v is not None else None, ".3f")
    if key == "step":
        return row["label"] + ("" if row["rc"] == 0 else f" (rc={row['rc']})")
    if spec is None:
        return "" if v is None else str(v)
    return _fmt(v, spec)


def markdown_table(table: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" if c[2] is None else "---:" for c in COLUMNS) + "|"
    body = ["| " + " | ".join(cell(r, k, s) for _, k, s in COLUMNS) + " |" for r in table]
    return "\n".join([head, sep, *body])


def print_table(table: list[dict[str, Any]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown_table(table))
        return
    t = Table(title="tvq vs mergekit (×mk = tvq / mergekit, lower is better)")
    for title, _, spec in COLUMNS:
        t.add_column(title, justify="left" if spec is None else "right")
    for r in table:
        t.add_row(*(cell(r, k, s) for _, k, s in COLUMNS))
    Console(width=250).print(t)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for pkg in ("torch", "safetensors", "transformers", "mergekit", "tvq"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


# ----------------------------------------------------------------------------- main


def have_tvq_merge() -> bool:
    proc = subprocess.run([shutil.which("tvq") or "tvq", "merge", "--help"], check=False, capture_output=True, text=True)
    return proc.returncode == 0


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    mult = {"": 1, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2)]
    base = 1024 if (m.group(3) == "IB" or m.group(3) is None) else 1000
    return int(float(m.group(1)) * base**mult)


def build_parser() -> argparse.ArgumentParser:
    """run.py's command line (also parsed by ``benchmarks/scaling.py`` for the same step settings)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench_llm"), help="models, packs, outputs, results")
    ap.add_argument("--skip-generate", action="store_true", help="do not generate missing models")
    ap.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (names or globs, e.g. 'quantize_*'); see --list")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--packs", nargs="+", choices=sorted(PACKS), default=DEFAULT_PACKS)
    ap.add_argument("--ties-scope", choices=["tensor", "global"], default="tensor", help="tvq TIES top-k scope (tensor = mergekit's)")
    ap.add_argument("--no-ckpt-merge", dest="ckpt_merge", action="store_false", help="skip tvq merge from the bf16 checkpoints")
    ap.add_argument("--no-capped", dest="capped", action="store_false", help="skip the cgroup-capped repeat")
    ap.add_argument("--cap", type=parse_size, default=3 * 2**30, help="memory.limit_in_bytes of the capped run (default 3GiB)")
    ap.add_argument("--cache", choices=["warm", "cold"], default="warm", help="warm: read inputs before each step; cold: drop caches")
    ap.add_argument("--no-fidelity", dest="fidelity", action="store_false", help="skip comparing merged models with mergekit's")
    ap.add_argument("--keep-outputs", action="store_true", help="keep tvq's merged models (deleted after hashing by default)")
    ap.add_argument("--mergekit-shard", default="1B", help="mergekit --out-shard-size (parameters)")
    ap.add_argument("--tvq-shard", default="2GB", help="tvq merge --max-shard-size")
    ap.add_argument("--mergekit-arg", action="append", default=[], help="extra mergekit-yaml argument (repeatable)")
    ap.add_argument("--tvq-quantize-arg", action="append", default=[], help="extra tvq quantize argument (repeatable)")
    ap.add_argument(
        "--omp-wait-policy",
        choices=["passive", "default"],
        default="passive",
        help="OMP_WAIT_POLICY for every step (both tools): passive avoids libgomp's spin-wait collapse when other "
        "processes compete for the cores; 'default' leaves the environment as it is",
    )
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every step, both tools (e.g. THP_MEM_ALLOC_ENABLE=1); repeatable",
    )
    ap.add_argument("--tvq-threads", type=int, default=2, help="tvq quantize/merge --threads N (0: tool default)")
    ap.add_argument("--tag", default="", help="suffix of results-<tag>.json/.md")
    return ap


def child_environment(args: argparse.Namespace) -> dict[str, str]:
    """Environment added to every step, both tools: OMP_WAIT_POLICY and each ``--env KEY=VALUE``."""
    env = {"OMP_WAIT_POLICY": "PASSIVE"} if args.omp_wait_policy == "passive" else {}
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def write_mergekit_configs(cfg_dir: Path, models: Path, tasks: list[str]) -> None:
    """``mergekit_ta.yml`` and ``mergekit_ties.yml`` (read by the mergekit steps of ``build_steps``)."""
    cfg_dir.mkdir(parents=True, exist_ok=True)
    for method, short in (("task_arithmetic", "ta"), ("ties", "ties")):
        (cfg_dir / f"mergekit_{short}.yml").write_text(mergekit_config(method, models, tasks))


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.workdir = args.workdir.resolve()

    tasks = [f"ft{t}" for t in range(args.tasks)]
    models = args.workdir / "models"
    have_merge = have_tvq_merge()
    steps = build_steps(args, tasks, have_merge, args.workdir)
    if args.list:
        for s in steps:
            print(f"{s.name:24s} {s.label}")
        if not have_merge:
            print("(tvq merge not available: merge steps omitted)")
        return 0
    if args.only:
        import fnmatch

        selected = [s for s in steps if any(fnmatch.fnmatch(s.name, pat) for pat in args.only)]
        unknown = [p for p in args.only if not any(fnmatch.fnmatch(s.name, p) for s in steps)]
        if unknown:
            ap.error(f"--only {unknown}: no such step (see --list)")
        steps = selected

    missing = [m for m in ["base", *tasks] if not (models / m / "model.safetensors.index.json").exists()]
    if missing:
        if args.skip_generate:
            ap.error(f"models missing under {models}: {missing} (drop --skip-generate to generate them)")
        sys.path.insert(0, str(HERE))
        import make_models

        make_models.main(["--workdir", str(args.workdir), "--tasks", str(args.tasks), "--only", *missing])

    if shutil.which("/usr/bin/time") is None and not Path("/usr/bin/time").exists():
        ap.error("/usr/bin/time missing: apt-get install time")
    cfg_dir = args.workdir / "configs"
    write_mergekit_configs(cfg_dir, models, tasks)
    log_dir = args.workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    started = dt.datetime.now(dt.timezone.utc)
    print(f"tvq LLM benchmark — {started:%Y-%m-%d %H:%M} UTC, workdir {args.workdir}, cache {args.cache}", flush=True)
    if not have_merge:
        print("note: `tvq merge` is not available yet; merge steps skipped", flush=True)
    try:
        child_env = child_environment(args)
    except ValueError as err:
        ap.error(str(err))
    results: list[Measurement] = []
    fidelity: dict[str, dict[str, float]] = {}
    all_steps = {s.name: s for s in build_steps(args, tasks, have_merge, args.workdir)}
    for s in steps:
        print(f"[{s.name}] {s.label}", flush=True)
        m = run_step(s, cgroup=None, cache=args.cache, log_dir=log_dir, hash_outputs=s.cappable, env=child_env)
        results.append(m)
        if s.kind != "merge" or m.rc != 0:
            continue
        ref_out = all_steps[s.reference].output if s.reference else None
        if args.fidelity and ref_out is not None and ref_out.is_dir() and any(ref_out.glob("*.safetensors")):
            t0 = time.perf_counter()
            fidelity[s.name] = merged_delta_error(s.output, ref_out, models / "base")
            print(
                f"    fidelity vs {s.reference}: rel. error of the merged delta {fidelity[s.name]['rel_delta_error']:.4f}, "
                f"{100 * fidelity[s.name]['equal_frac']:.1f}% of weights bit-equal ({time.perf_counter() - t0:.0f} s, untimed)",
                flush=True,
            )
        if not args.keep_outputs:
            shutil.rmtree(s.output, ignore_errors=True)  # hashed already; merged models are 2.2 GB each

    if args.capped:
        cg = Cgroup(args.cap)
        cap_root = args.workdir / "capped"
        capped_steps = {s.name: s for s in build_steps(args, tasks, have_merge, cap_root)}
        print(f"capped repeat: {cg.path} memory.limit_in_bytes={args.cap}", flush=True)
        for s in steps:
            if not s.cappable:
                continue
            cs = capped_steps[s.name]
            print(f"[{cs.name}] {cs.label} (capped)", flush=True)
            results.append(run_step(cs, cgroup=cg, cache=args.cache, log_dir=log_dir, hash_outputs=True, env=child_env))
            ref = next(m for m in results if m.step == s.name and not m.capped)
            got = results[-1]
            same = got.rc == 0 and got.files == ref.files
            print(f"    outputs {'identical' if same else 'DIFFER'} to the uncapped run ({len(ref.files)} files)", flush=True)
            if cs.kind == "merge" and not args.keep_outputs:
                shutil.rmtree(cs.output, ignore_errors=True)
        cg.remove()

    step_map = {s.name: s for s in steps}
    table = rows(results, step_map, fidelity)
    print_table(table)
    payload = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "workdir": str(args.workdir),
            "cache": args.cache,
            "child_env": child_env,
            "tvq_threads": args.tvq_threads,
            "cap_bytes": args.cap,
            "lambda": LAMBDA,
            "density": DENSITY,
            "ties_scope": args.ties_scope,
            "model": json.loads((models / "generation.json").read_text()) if (models / "generation.json").exists() else None,
            "mergekit_configs": {p.name: p.read_text() for p in sorted(cfg_dir.glob("*.yml"))},
            "commands": {s.name: shlex.join(s.cmd) for s in steps},
        },
        "table": table,
        "measurements": [asdict(m) for m in results],
        "fidelity": fidelity,
    }
    suffix = f"-{args.tag}" if args.tag else ""
    (args.workdir / f"results{suffix}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.workdir / f"results{suffix}.md").write_text(
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {payload['machine']['cpu']}, {payload['machine']['cores']} cores, "
        f"{payload['machine']['ram_gib']} GiB RAM; cache {args.cache}.\n\n" + markdown_table(table) + "\n"
    )
    print(f"wrote {args.workdir / f'results{suffix}.json'} and results{suffix}.md", flush=True)
    return 0 if all(m.rc == 0 for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
